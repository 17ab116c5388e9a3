//! The page shell: head, navigation by audience, footer; and small shared
//! pieces (time formatting, badges).

use maud::{html, Markup, DOCTYPE};

use super::{assets, Viewer};
use crate::auth::Action;

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    /// The dashboard and appliance pages.
    Dashboard,
    /// Enrollment.
    Enroll,
    /// The current policy and its editor.
    Policy,
    /// Policy history.
    History,
    /// External services.
    Services,
    /// Image releases and their rollout.
    Updates,
}

/// One navigation entry: the audience section it sits in, what it needs.
struct Item {
    nav: Nav,
    href: &'static str,
    label: &'static str,
    needs: Action,
}

/// The navigation, grouped by audience. The push issue adds an "Approvals"
/// section (approvers), the audit issue an "Audit" one (auditors); a section
/// shows only when the viewer may open one of its entries.
const SECTIONS: &[(&str, &[Item])] = &[(
    "Network",
    &[
        Item { nav: Nav::Dashboard, href: "/", label: "Dashboard", needs: Action::ReadAppliances },
        Item {
            nav: Nav::Enroll,
            href: "/appliances/new",
            label: "Enroll",
            needs: Action::ManageAppliances,
        },
        Item { nav: Nav::Policy, href: "/policy", label: "Policy", needs: Action::ReadPolicy },
        Item {
            nav: Nav::History,
            href: "/policy/versions",
            label: "History",
            needs: Action::ReadPolicy,
        },
        Item {
            nav: Nav::Services,
            href: "/services",
            label: "External services",
            needs: Action::ReadPolicy,
        },
        Item {
            nav: Nav::Updates,
            href: "/updates",
            label: "Image updates",
            needs: Action::ReadReleases,
        },
    ],
)];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Airlock" }
            link rel="icon" href=(assets::url("favicon", "svg"));
            link rel="stylesheet" href=(assets::url("app", "css"));
            script src=(assets::url("app", "js")) defer {}
        }
    }
}

/// A full page for a logged-in viewer.
pub fn page(v: &Viewer, nav: Nav, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { img src=(assets::url("favicon", "svg")) alt=""; "Airlock" }
                    nav.main aria-label="Main" {
                        @for (section, items) in SECTIONS {
                            @if items.iter().any(|i| v.may(i.needs)) {
                                section aria-label=(section) {
                                    h2 { (section) }
                                    @for i in items.iter().filter(|i| v.may(i.needs)) {
                                        a href=(i.href) aria-current=[(i.nav == nav).then_some("page")] { (i.label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span { "Signed in as " strong { (v.subject.user) } }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main { (body) }
                footer {
                    "Automatic log-off after " (v.idle_secs / 60) " minutes without activity. "
                    "Airlock controller " (env!("CARGO_PKG_VERSION")) "."
                }
            }
        }
    }
}

/// A page without navigation (login, errors).
pub fn bare(title: &str, text: &str) -> Markup {
    bare_with(title, html! { p { (text) } p { a href="/" { "Back to the dashboard" } } })
}

/// A page without navigation around `body`.
pub fn bare_with(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main #main.login {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// "12 s ago", "3 min ago", "2 h ago", "4 d ago".
pub fn ago(now: u64, then: u64) -> String {
    let d = now.saturating_sub(then);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86_400),
    }
}

/// A duration: "45 s", "12 min", "5 h", "3 d".
pub fn span(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// Unix seconds as `2026-11-23 14:05:09 UTC`.
pub fn utc(t: u64) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| d.format(&fmt).ok())
        .unwrap_or_else(|| t.to_string())
}

/// A `<time>` element with the absolute time as its tooltip.
pub fn when(now: u64, t: u64) -> Markup {
    html! { time datetime=(utc(t)) title=(utc(t)) { (ago(now, t)) } }
}

/// A coloured status word; the word carries the meaning, not the colour.
pub fn badge(class: &str, text: &str) -> Markup {
    html! { span class={ "badge " (class) } { (text) } }
}

/// Large counts readable at a glance: 950, 12.3k, 4.1M.
pub fn count(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0}k", n / 1e3)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else if n >= 10.0 || n == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_times_and_counts() {
        assert_eq!(ago(100, 88), "12 s ago");
        assert_eq!(ago(100, 200), "0 s ago", "a clock ahead is not negative");
        assert_eq!(ago(4000, 100), "1 h ago");
        assert_eq!(span(600), "10 min");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(count(0.0), "0");
        assert_eq!(count(2.25), "2.2");
        assert_eq!(count(1234.0), "1.2k");
        assert_eq!(count(56_789.0), "57k");
        assert_eq!(count(4_100_000.0), "4.1M");
    }
}
