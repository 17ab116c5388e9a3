//! Reading from the operator: a password without echo, a yes/no
//! confirmation. Both need standard input to be a terminal; scripts use
//! `--password-stdin` and `--yes` instead, so nothing hangs waiting for a
//! prompt nobody sees.

use std::io::{BufRead as _, Write as _};

use rustix::termios::{self, LocalModes, OptionalActions};

/// Prompt failures.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// Standard input is not a terminal.
    #[error("standard input is not a terminal, so there is nobody to ask: {0}")]
    NoTerminal(&'static str),
    /// Reading failed.
    #[error("cannot read from the terminal")]
    Io(#[from] std::io::Error),
    /// Input ended before a line.
    #[error("no input: {0}")]
    Empty(&'static str),
}

fn stdin_is_terminal() -> bool {
    termios::isatty(std::io::stdin())
}

/// Restores the terminal's modes when dropped (also on an early return).
struct EchoOff(Option<termios::Termios>);

impl EchoOff {
    fn new() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else { return Self(None) };
        let mut t = saved.clone();
        t.local_modes.remove(LocalModes::ECHO);
        t.local_modes.insert(LocalModes::ECHONL);
        match termios::tcsetattr(&stdin, OptionalActions::Now, &t) {
            Ok(()) => Self(Some(saved)),
            Err(_) => Self(None),
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
    }
}

fn strip_newline(mut s: String) -> String {
    while s.ends_with(['\n', '\r']) {
        s.pop();
    }
    s
}

/// Asks for a password on the terminal with echo off.
pub fn password(prompt: &str) -> Result<String, PromptError> {
    if !stdin_is_terminal() {
        return Err(PromptError::NoTerminal("pass --password-stdin and pipe the password in"));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let _guard = EchoOff::new();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Err(PromptError::Empty("no password given"));
    }
    Ok(strip_newline(line))
}

/// Reads the password from standard input: its first line.
pub fn password_from_stdin() -> Result<String, PromptError> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let p = strip_newline(line);
    if p.is_empty() {
        return Err(PromptError::Empty("standard input held no password"));
    }
    Ok(p)
}

/// Asks `question [y/N]`; true only for `y` or `yes`.
pub fn confirm(question: &str) -> Result<bool, PromptError> {
    if !stdin_is_terminal() {
        return Err(PromptError::NoTerminal("pass --yes to go ahead without confirming"));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

/// A confirmation that could not be asked: the refusal, saying why and
/// what to do.
pub fn unconfirmed(e: PromptError, refused: &str) -> anyhow::Error {
    match e {
        PromptError::NoTerminal(_) => crate::context::Refusal::Refused(format!(
            "{refused} (standard input is not a terminal, so nobody could confirm; pass --yes)"
        ))
        .into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn newlines_are_stripped_but_nothing_else() {
        assert_eq!(super::strip_newline("pw \r\n".into()), "pw ");
        assert_eq!(super::strip_newline("pw".into()), "pw");
    }
}
