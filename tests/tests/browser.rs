//! End to end, as root: Debian's headless Chromium (through chromedriver)
//! opens the real controller's pages over HTTPS, trusting the controller's
//! own CA through a per-session NSS database, and refuses the same page
//! without it. The web UI's browser tests build on this harness.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use airlock_testbed::{
    browser::{self, processes_using},
    unique_prefix, Browser, BrowserOptions, Controller, ControllerOptions, NetNs,
    CONTROLLER_READY_TIMEOUT,
};

const MAIN: u16 = 8443;

/// A fresh controller on 127.0.0.1 inside its own namespace.
fn controller(ns: &NetNs) -> Controller {
    let main = SocketAddr::from(([127, 0, 0, 1], MAIN));
    let agent = SocketAddr::from(([127, 0, 0, 1], MAIN + 1));
    let data = std::env::temp_dir().join(format!("airlock-browser-ctl-{}", unique_prefix()));
    Controller::start(ControllerOptions {
        netns: ns.name().to_owned(),
        data_dir: data,
        bin: None,
        listen: main,
        agent_listen: agent,
        public_url: format!("https://{main}"),
        agent_url: format!("https://{agent}"),
        server_names: vec!["127.0.0.1".to_owned()],
        api_addr: main,
        ready_timeout: CONTROLLER_READY_TIMEOUT,
        die_with_parent: true,
        update_key: None,
    })
    .expect("controller starts")
}

/// Nothing of a closed session is left: its HOME is gone and no process
/// (chromedriver, Chromium, its helpers) mentions it.
fn assert_gone(home: &Path, driver: Option<u32>) {
    assert!(!home.exists(), "{} removed", home.display());
    assert_eq!(processes_using(home), Vec::<i32>::new(), "processes of the session left");
    let pid = driver.expect("chromedriver ran");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "chromedriver {pid} is gone");
}

fn is_png(path: &PathBuf) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn the_controller_page_opens_with_its_ca_trusted_and_is_refused_without_it() {
    let ns = NetNs::unique().expect("namespace");
    let ctl = controller(&ns);
    let url = format!("https://127.0.0.1:{MAIN}/login");
    let fingerprint = ctl.record().ca_fingerprint.clone();

    // Trusted: the page, over validated TLS.
    let b = Browser::start(
        BrowserOptions::new("browser-smoke").in_netns(ns.name()).trust_ca(&ctl.record().ca_pem),
    )
    .expect("browser starts");
    b.goto(&url).expect("the page loads with the CA trusted");
    assert_eq!(b.current_url().expect("url"), url);
    assert!(b.title().expect("title").contains("Airlock"), "{}", b.title().expect("title"));
    let h1 = b.wait_for_text("h1", "Airlock").expect("heading");
    assert!(h1.is_displayed().expect("displayed"));
    // The page's own statement of the CA matches the CA the browser trusted.
    let body = b.find("body").expect("body").text().expect("text");
    assert!(body.contains(&fingerprint), "{body}");
    let proto = b.execute("return window.location.protocol;", vec![]).expect("script");
    assert_eq!(proto, "https:");
    // Without a session, the dashboard sends the browser to this page and back.
    b.goto(&format!("https://127.0.0.1:{MAIN}/")).expect("the dashboard");
    b.wait_for_url("the login page", |u| u.ends_with("/login?next=/")).expect("redirected");
    b.back().expect("back");
    b.wait_for_url("back on the login page", |u| u == url).expect("back");
    let shot = b.screenshot("main").expect("screenshot");
    assert!(shot.ends_with("ui-artifacts/browser-smoke/main.png"), "{}", shot.display());
    assert!(is_png(&shot), "{} is a PNG", shot.display());
    let (home, driver) = (b.home().to_owned(), b.driver_pid());
    assert!(home.join(".pki/nssdb/cert9.db").is_file(), "per-session NSS database");
    b.close().expect("session ends");
    assert_gone(&home, driver);

    // Not trusted: Chromium refuses the certificate; the content never shows.
    let b = Browser::start(BrowserOptions::new("browser-smoke").in_netns(ns.name()))
        .expect("browser starts");
    match b.goto(&url) {
        Err(browser::Error::WebDriver { message, .. }) => {
            assert!(message.contains("ERR_CERT_AUTHORITY_INVALID"), "{message}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(()) => {
            let page = b.source().expect("source");
            assert!(page.contains("ERR_CERT_AUTHORITY_INVALID"), "an error page: {page}");
        }
    }
    let page = b.source().expect("source");
    assert!(!page.contains(&fingerprint), "the controller's page must not show");
    assert!(is_png(&b.screenshot("untrusted").expect("screenshot")));
    let (home, driver) = (b.home().to_owned(), b.driver_pid());
    drop(b);
    assert_gone(&home, driver);
}

#[test]
fn waits_end_with_what_was_last_seen_and_a_panic_cleans_up() {
    let b = Browser::start(BrowserOptions::new("browser-wait")).expect("browser starts");
    b.goto("data:text/html,<title>t</title><p id=x>one</p>").expect("data URL");
    let err = b
        .wait_until("two", Duration::from_millis(300), || {
            Ok(Some(b.find("#x")?.text()?).filter(|t| t == "two"))
        })
        .expect_err("never two");
    assert!(matches!(err, browser::Error::Timeout { .. }), "{err}");
    let err = b.find("#missing").expect_err("no such element");
    assert!(err.to_string().contains("no such element"), "{err}");
    b.execute("document.getElementById('x').textContent = 'two';", vec![]).expect("script");
    assert_eq!(b.wait_for_text("#x", "two").expect("changed").text().expect("text"), "two");
    assert!(matches!(b.screenshot("../x"), Err(browser::Error::BadName(_))));

    // Forms: typing, reading the value back, submitting (the handler runs).
    b.goto(
        "data:text/html,<title>form</title><form onsubmit=\"document.title='got '+this.q.value;\
         return false\"><label>Q <input name=q value=old></label><button>Go</button></form>",
    )
    .expect("form page");
    b.fill("input[name=q]", "hello").expect("fill");
    let q = b.find("input[name=q]").expect("field");
    assert_eq!(q.property("value").expect("value"), "hello");
    assert_eq!(q.attr("value").expect("attr").as_deref(), Some("old"));
    q.submit().expect("submit");
    b.wait_until("the title", Duration::from_secs(5), || {
        Ok(Some(b.title()?).filter(|t| t == "got hello"))
    })
    .expect("submitted");

    let (home, driver) = (b.home().to_owned(), b.driver_pid());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _b = b;
        panic!("a failing UI test");
    }));
    assert!(panicked.is_err());
    assert_gone(&home, driver);
    let shot = airlock_testbed::target_dir().join("ui-artifacts/browser-wait/panic.png");
    assert!(is_png(&shot), "a screenshot at the panic: {}", shot.display());
}
