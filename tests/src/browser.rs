//! [`Browser`]: Debian's headless Chromium, driven through `chromedriver`
//! over the W3C WebDriver protocol, for the web UI's end-to-end tests.
//!
//! ```text
//!  test ──HTTP/1.1 (hyper)──▶ chromedriver 127.0.0.1:<free port> ──▶ chromium --headless
//!                             (in the controller's namespace, if given)   HOME=<temp dir>
//!                                                                          └ .pki/nssdb: the CA
//! ```
//!
//! - TLS is validated for real: the controller's CA is imported into the
//!   session's own NSS database (`certutil`) under a temporary HOME, the
//!   place Chromium on Linux reads user-trusted CAs from. Nothing relaxes
//!   certificate checks; a session without the CA gets Chromium's error page.
//! - Everything a session creates (chromedriver, the browser's process tree,
//!   the temporary HOME and profile) is removed on [`Browser::close`] or on
//!   drop, also when the test panics (a `panic` screenshot is saved first).
//! - Screenshots go to `target/ui-artifacts/<test name>/<name>.png`.
//!
//! The client is a few WebDriver commands over hyper, which the testbed uses
//! already: no second HTTP or TLS stack, and its sockets can be opened inside
//! a lab namespace like [`crate::ControllerApi`]'s.

use std::{
    fmt,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::DirBuilderExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Request};
use serde_json::{json, Value};

use crate::{cmd, host::target_dir, names, NetNs};

/// Errors of the browser harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A testbed helper failed (a namespace, `certutil`).
    #[error(transparent)]
    Testbed(#[from] crate::Error),
    /// chromedriver did not answer `/status` as ready in time.
    #[error("chromedriver not ready after {waited:?}; its log ends:\n{log_tail}")]
    DriverNotReady {
        /// How long it was given.
        waited: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// The HTTP exchange with chromedriver failed.
    #[error("{what}: no answer from chromedriver")]
    Http {
        /// The command.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// chromedriver answered with a WebDriver error.
    #[error("{command}: {error}: {message}")]
    WebDriver {
        /// The command (`POST /session/…/url`).
        command: String,
        /// The W3C error code (`no such element`, `unknown error`, …).
        error: String,
        /// chromedriver's message (the first line).
        message: String,
    },
    /// An answer that does not have the expected shape.
    #[error("{command}: unexpected answer: {detail}")]
    Protocol {
        /// The command.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// A wait ran out.
    #[error("waited {waited:?} for {what}; last seen: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last observation (or error).
        last: String,
    },
    /// A screenshot name that is not a plain file name.
    #[error("invalid screenshot name {0:?} (letters, digits, '-', '_' and '.')")]
    BadName(String),
}

/// The browser harness's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Where Debian installs the two programs.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// One WebDriver exchange (a navigation included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// chromedriver answering `/status`.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for the `wait_*` helpers.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Between two polls of a wait.
const POLL: Duration = Duration::from_millis(100);

/// How to start a [`Browser`].
#[derive(Debug, Clone)]
pub struct BrowserOptions {
    /// Names the artifacts directory (`target/ui-artifacts/<test_name>`).
    pub test_name: String,
    /// Run chromedriver and Chromium in this network namespace (a lab's
    /// controller namespace); the host's when `None`.
    pub netns: Option<String>,
    /// CA certificates (PEM files) the browser trusts for TLS servers.
    pub trusted_cas: Vec<PathBuf>,
    /// Window size in CSS pixels (screenshots have this size).
    pub window: (u32, u32),
}

impl BrowserOptions {
    /// Defaults for the test `test_name`: host namespace, no CA trusted
    /// beyond the system's, 1280×900.
    pub fn new(test_name: impl Into<String>) -> Self {
        BrowserOptions {
            test_name: test_name.into(),
            netns: None,
            trusted_cas: Vec::new(),
            window: (1280, 900),
        }
    }

    /// Runs the browser inside namespace `netns`.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// Trusts the CA in `pem` (e.g. a controller's `ca.pem`).
    pub fn trust_ca(mut self, pem: impl Into<PathBuf>) -> Self {
        self.trusted_cas.push(pem.into());
        self
    }
}

/// A headless Chromium session. Its methods block; dropping it ends the
/// session and removes everything it started or created.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    netns: Option<String>,
    driver_addr: SocketAddr,
    driver: Option<Child>,
    session: Option<String>,
    dir: PathBuf,
    artifacts: PathBuf,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("netns", &self.netns)
            .field("driver_addr", &self.driver_addr)
            .field("session", &self.session)
            .field("dir", &self.dir)
            .finish()
    }
}

/// An element of the current page (valid until the page changes).
#[derive(Clone)]
pub struct Element<'b> {
    browser: &'b Browser,
    id: String,
}

impl fmt::Debug for Element<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Element").field("id", &self.id).finish()
    }
}

impl Browser {
    /// Starts chromedriver on a free port and a headless session through it.
    pub fn start(opts: BrowserOptions) -> Result<Browser> {
        if !valid_name(&opts.test_name) {
            return Err(Error::BadName(opts.test_name));
        }
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
                Error::Http { what: "starting the client runtime".into(), source: e.into() }
            })?;
        let dir = std::env::temp_dir().join(format!("airlock-browser-{}", names::unique_prefix()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|source| Error::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let mut b = Browser {
            rt,
            netns: opts.netns.clone(),
            driver_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            driver: None,
            session: None,
            artifacts: target_dir().join("ui-artifacts").join(&opts.test_name),
            dir,
        };
        // From here on, Drop cleans up whatever happens.
        b.trust(&opts.trusted_cas)?;
        b.spawn_driver()?;
        b.new_session(opts.window)?;
        Ok(b)
    }

    /// A per-session NSS database under the temporary HOME with `cas` as
    /// trusted CAs for TLS servers (`-t C,,`).
    fn trust(&self, cas: &[PathBuf]) -> Result<()> {
        let db = self.dir.join(".pki/nssdb");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&db)
            .map_err(|source| Error::Io { what: "creating", path: db.clone(), source })?;
        let db_arg = format!("sql:{}", db.display());
        cmd::output(Command::new("certutil").args(["-N", "--empty-password", "-d", &db_arg]))?;
        for (i, pem) in cas.iter().enumerate() {
            cmd::output(
                Command::new("certutil")
                    .args(["-A", "-t", "C,,", "-d", &db_arg])
                    .args(["-n", &format!("airlock-ca-{i}"), "-i"])
                    .arg(pem),
            )?;
        }
        Ok(())
    }

    fn spawn_driver(&mut self) -> Result<()> {
        let port = self.in_ns(|| TcpListener::bind(("127.0.0.1", 0)))?;
        let port = port
            .and_then(|l| l.local_addr())
            .map_err(|source| Error::Io {
                what: "binding a port in",
                path: self.dir.clone(),
                source,
            })?
            .port();
        self.driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = self.dir.join("chromedriver.log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}/{ns}", names::NETNS_DIR)).arg(CHROMEDRIVER);
                c
            }
            None => Command::new(CHROMEDRIVER),
        };
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .env("HOME", &self.dir)
            .env("TMPDIR", &self.dir)
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: runs in the forked child before exec; setsid and prctl are
        // async-signal-safe. Its own process group lets the whole tree be
        // killed at once; it dies with the test if the test is killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().map_err(|source| Error::Spawn { cmd: cmd::describe(&cmd), source })?;
        self.driver = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(v) = self.command("GET", "/status", None) {
                if v["ready"] == Value::Bool(true) {
                    return Ok(());
                }
            }
            let exited = self.driver.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
            if exited || start.elapsed() > DRIVER_READY_TIMEOUT {
                return Err(Error::DriverNotReady {
                    waited: start.elapsed(),
                    log_tail: self.driver_log_tail(20),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn new_session(&mut self, (w, h): (u32, u32)) -> Result<()> {
        let profile = self.dir.join("profile");
        let args = [
            "--headless=new".to_owned(),
            // Root cannot use Chromium's sandbox (CI runs the tests as root).
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-breakpad".to_owned(),
            "--password-store=basic".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={w},{h}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": 30_000, "script": 30_000, "implicit": 0},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = self.command("POST", "/session", Some(caps))?;
        let id = v["sessionId"].as_str().ok_or_else(|| Error::Protocol {
            command: "POST /session".into(),
            detail: format!("no sessionId in {v}"),
        })?;
        self.session = Some(id.to_owned());
        Ok(())
    }

    /// Runs `f` in the browser's namespace (sockets made there stay there).
    fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        match &self.netns {
            Some(ns) => Ok(NetNs::existing(ns).run(f)?),
            None => Ok(f()),
        }
    }

    /// One WebDriver command; the answer's `value`.
    fn command(&self, method: &'static str, path: &str, body: Option<Value>) -> Result<Value> {
        let what = format!("{method} {path}");
        let http = |e: Box<dyn std::error::Error + Send + Sync>| Error::Http {
            what: what.clone(),
            source: e,
        };
        let addr = self.driver_addr;
        let tcp = self
            .in_ns(move || TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT))?
            .map_err(|e| http(e.into()))?;
        tcp.set_nonblocking(true).map_err(|e| http(e.into()))?;
        let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
        if body.is_some() {
            req = req.header("content-type", "application/json; charset=utf-8");
        }
        let req = req
            .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
            .map_err(|e| http(e.into()))?;
        let exchange = async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        };
        let (status, bytes) = self
            .rt
            .block_on(async { tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await })
            .map_err(|e| http(e.into()))?
            .map_err(http)?;
        let mut v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            command: what.clone(),
            detail: format!("HTTP {status}, not JSON: {e}"),
        })?;
        let value = v["value"].take();
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let first_line =
            |s: &Value| s.as_str().unwrap_or_default().lines().next().unwrap_or("").to_owned();
        Err(Error::WebDriver {
            command: what,
            error: value["error"].as_str().unwrap_or("unknown").to_owned(),
            message: first_line(&value["message"]),
        })
    }

    /// A command on this session.
    fn session_cmd(&self, method: &'static str, tail: &str, body: Option<Value>) -> Result<Value> {
        let Some(id) = &self.session else {
            return Err(Error::Protocol { command: tail.into(), detail: "no session".into() });
        };
        self.command(method, &format!("/session/{id}{tail}"), body)
    }

    /// Navigates to `url` and waits for the page to load. A TLS failure
    /// (untrusted certificate) is an [`Error::WebDriver`] whose message names
    /// the `net::ERR_CERT_…` code.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.session_cmd("POST", "/url", Some(json!({"url": url}))).map(drop)
    }

    /// The current page's URL.
    pub fn current_url(&self) -> Result<String> {
        string(self.session_cmd("GET", "/url", None)?, "GET url")
    }

    /// The current page's title.
    pub fn title(&self) -> Result<String> {
        string(self.session_cmd("GET", "/title", None)?, "GET title")
    }

    /// The current page's HTML.
    pub fn source(&self) -> Result<String> {
        string(self.session_cmd("GET", "/source", None)?, "GET source")
    }

    /// Back in the history.
    pub fn back(&self) -> Result<()> {
        self.session_cmd("POST", "/back", Some(json!({}))).map(drop)
    }

    /// Reloads the page.
    pub fn refresh(&self) -> Result<()> {
        self.session_cmd("POST", "/refresh", Some(json!({}))).map(drop)
    }

    /// The first element matching the CSS selector (an error if none).
    pub fn find(&self, css: &str) -> Result<Element<'_>> {
        let v = self.session_cmd("POST", "/element", Some(by_css(css)))?;
        self.element(&v, "find")
    }

    /// Every element matching the CSS selector (in document order).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element<'_>>> {
        let v = self.session_cmd("POST", "/elements", Some(by_css(css)))?;
        let list = v.as_array().ok_or_else(|| Error::Protocol {
            command: "find_all".into(),
            detail: format!("not a list: {v}"),
        })?;
        list.iter().map(|e| self.element(e, "find_all")).collect()
    }

    fn element(&self, v: &Value, command: &str) -> Result<Element<'_>> {
        match v[ELEMENT_KEY].as_str() {
            Some(id) => Ok(Element { browser: self, id: id.to_owned() }),
            None => Err(Error::Protocol {
                command: command.into(),
                detail: format!("not an element: {v}"),
            }),
        }
    }

    /// Types `text` into the field matching `css` after clearing it.
    pub fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        e.clear()?;
        e.type_text(text)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the
    /// page and returns what it returns. Elements pass as
    /// [`Element::to_arg`].
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.session_cmd("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// Polls `probe` until it returns `Some` (every 100 ms, up to
    /// `timeout`). A probe error counts as "not yet" and is reported if the
    /// wait runs out.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            let last = match probe() {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => "not yet".to_owned(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(Error::Timeout { what: what.to_owned(), waited: timeout, last });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (up to [`DEFAULT_WAIT`]) for an element matching `css`.
    pub fn wait_for(&self, css: &str) -> Result<Element<'_>> {
        self.wait_until(&format!("an element {css:?}"), DEFAULT_WAIT, || {
            Ok(self.find_all(css)?.into_iter().next())
        })
    }

    /// Waits (up to [`DEFAULT_WAIT`]) for an element matching `css` whose
    /// text contains `text`.
    pub fn wait_for_text(&self, css: &str, text: &str) -> Result<Element<'_>> {
        self.wait_until(&format!("an element {css:?} with text {text:?}"), DEFAULT_WAIT, || {
            for e in self.find_all(css)? {
                if e.text()?.contains(text) {
                    return Ok(Some(e));
                }
            }
            Ok(None)
        })
    }

    /// Waits (up to [`DEFAULT_WAIT`]) until the URL satisfies `ok`.
    pub fn wait_for_url(&self, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
        self.wait_until(what, DEFAULT_WAIT, || Ok(Some(self.current_url()?).filter(|u| ok(u))))
    }

    /// Saves a PNG of the viewport as
    /// `target/ui-artifacts/<test name>/<name>.png`; its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_owned()));
        }
        let v = self.session_cmd("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| Error::Protocol { command: "screenshot".into(), detail: e.to_string() })?;
        std::fs::create_dir_all(&self.artifacts).map_err(|source| Error::Io {
            what: "creating",
            path: self.artifacts.clone(),
            source,
        })?;
        let path = self.artifacts.join(format!("{name}.png"));
        std::fs::write(&path, png).map_err(|source| Error::Io {
            what: "writing",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The session's temporary HOME (profile, NSS database, driver log);
    /// removed when the session ends.
    pub fn home(&self) -> &Path {
        &self.dir
    }

    /// chromedriver's process id (also its process group's).
    pub fn driver_pid(&self) -> Option<u32> {
        self.driver.as_ref().map(Child::id)
    }

    /// The artifacts directory of this test.
    pub fn artifacts_dir(&self) -> &Path {
        &self.artifacts
    }

    /// Ends the session and removes everything, reporting a failure to end
    /// the session (drop does the same silently).
    pub fn close(mut self) -> Result<()> {
        let ended = self.end_session();
        self.teardown();
        ended
    }

    fn end_session(&mut self) -> Result<()> {
        match self.session.take() {
            Some(id) => self.command("DELETE", &format!("/session/{id}"), None).map(drop),
            None => Ok(()),
        }
    }

    /// Kills chromedriver's process group and any process still running
    /// with this session's HOME, then removes the temporary directory.
    fn teardown(&mut self) {
        if let Some(mut child) = self.driver.take() {
            if let Ok(pgid) = i32::try_from(child.id()) {
                // SAFETY: plain syscall; the group is chromedriver's own (setsid).
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let start = Instant::now();
        loop {
            let left = processes_using(&self.dir);
            if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            for pid in left {
                // SAFETY: plain syscall on a pid just read from /proc.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("airlock-testbed: cannot remove {}: {e}", self.dir.display());
            }
        }
    }

    fn driver_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() && self.session.is_some() {
            match self.screenshot("panic") {
                Ok(p) => eprintln!("airlock-testbed: browser at the panic: {}", p.display()),
                Err(e) => eprintln!("airlock-testbed: no panic screenshot: {e}"),
            }
        }
        let _ = self.end_session();
        self.teardown();
    }
}

impl Element<'_> {
    fn cmd(&self, method: &'static str, tail: &str, body: Option<Value>) -> Result<Value> {
        self.browser.session_cmd(method, &format!("/element/{}{tail}", self.id), body)
    }

    /// The element as a script argument for [`Browser::execute`].
    pub fn to_arg(&self) -> Value {
        json!({ ELEMENT_KEY: self.id })
    }

    /// Clicks it (scrolled into view first by the driver).
    pub fn click(&self) -> Result<()> {
        self.cmd("POST", "/click", Some(json!({}))).map(drop)
    }

    /// Empties an input or textarea.
    pub fn clear(&self) -> Result<()> {
        self.cmd("POST", "/clear", Some(json!({}))).map(drop)
    }

    /// Types `text` into it (appends to what is there).
    pub fn type_text(&self, text: &str) -> Result<()> {
        self.cmd("POST", "/value", Some(json!({"text": text}))).map(drop)
    }

    /// Submits the form it is (or is in), as pressing its submit button
    /// does: validation and `submit` handlers run.
    pub fn submit(&self) -> Result<()> {
        let script = "const e = arguments[0]; const f = e.form || e.closest('form'); \
                      if (!f) { throw new Error('not in a form'); } f.requestSubmit();";
        self.browser.execute(script, vec![self.to_arg()]).map(drop)
    }

    /// Its rendered text.
    pub fn text(&self) -> Result<String> {
        string(self.cmd("GET", "/text", None)?, "element text")
    }

    /// An attribute as written in the HTML (`None` if absent).
    pub fn attr(&self, name: &str) -> Result<Option<String>> {
        Ok(self.cmd("GET", &format!("/attribute/{name}"), None)?.as_str().map(str::to_owned))
    }

    /// A DOM property (`value` of an input, `checked`, …).
    pub fn property(&self, name: &str) -> Result<Value> {
        self.cmd("GET", &format!("/property/{name}"), None)
    }

    /// Whether it is displayed.
    pub fn is_displayed(&self) -> Result<bool> {
        Ok(self.cmd("GET", "/displayed", None)?.as_bool().unwrap_or(false))
    }

    /// The first descendant matching `css`.
    pub fn find(&self, css: &str) -> Result<Element<'_>> {
        let v = self.cmd("POST", "/element", Some(by_css(css)))?;
        self.browser.element(&v, "find in element")
    }
}

fn by_css(css: &str) -> Value {
    json!({"using": "css selector", "value": css})
}

fn string(v: Value, command: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s),
        other => {
            Err(Error::Protocol { command: command.into(), detail: format!("not text: {other}") })
        }
    }
}

/// A plain file name: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Processes whose environment or command line mentions `dir` (the
/// session's HOME and profile: chromedriver, Chromium and its helpers).
pub fn processes_using(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != me))
        .filter(|pid| {
            ["environ", "cmdline"].iter().any(|f| {
                std::fs::read(format!("/proc/{pid}/{f}"))
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        assert!(valid_name("dashboard"));
        assert!(valid_name("appliance-detail_2.v1"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".hidden"));
    }
}
