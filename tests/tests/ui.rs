//! End to end, as root, in a real browser: an admin drives the web UI of the
//! lab's real controller in Debian's headless Chromium (TLS validated
//! against the controller's CA), enrolls the lab appliance, whose real agent
//! then enrolls itself with the token shown, edits the policy with an error
//! (shown next to its line, nothing applied), fixes it, reviews the diff,
//! applies it, watches the appliance converge, and rolls back. Every page is
//! saved as a screenshot under target/ui-artifacts/admin-workflow/.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use airlock_testbed::{
    addr, is_applied, unique_prefix, Browser, BrowserOptions, Lab, LabOptions, LAB_APPLIANCE,
};
use serde_json::Value;

const LAB_POLICY: &str = include_str!("../../policies/lab.toml");
const CONVERGE: Duration = Duration::from_secs(60);

/// Replaces the editor's text (as a paste would).
fn set_policy_text(b: &Browser, text: &str) {
    let ta = b.find("#policy-text").expect("the editor");
    b.execute("arguments[0].value = arguments[1];", vec![ta.to_arg(), Value::from(text)])
        .expect("set the text");
}

/// Waits until the convergence table says every enrolled appliance enforces the page's version.
fn wait_converged(b: &Browser) {
    b.wait_until("the appliance to converge", CONVERGE, || {
        let t = b.find("#convergence").and_then(|e| e.text())?;
        Ok(t.contains("1 of 1 enrolled appliances enforce it").then_some(()))
    })
    .expect("the live region shows the appliance on the new version");
}

/// Basic accessibility checks on the page in the browser: a language, one
/// `h1`, a label for every field, alt text, no empty control, text contrast
/// at least WCAG AA (4.5:1, 3:1 for large text) on its computed background,
/// and nothing wider than the window (tables scroll inside their box).
const A11Y: &str = r#"
const problems = [];
if (!document.documentElement.lang) problems.push("no lang attribute");
const h1 = document.querySelectorAll("h1").length;
if (h1 !== 1) problems.push(h1 + " h1 elements");
for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
  if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label")) problems.push("unlabelled field " + (el.id || el.name));
}
for (const img of document.querySelectorAll("img")) if (!img.hasAttribute("alt")) problems.push("img without alt");
for (const c of document.querySelectorAll("button:not([hidden]), a[href]")) {
  if (!c.textContent.trim() && !c.getAttribute("aria-label")) problems.push("control without a name");
}
function rgb(c) { return c.match(/[\d.]+/g).slice(0, 3).map(Number); }
function lum([r, g, b]) {
  const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
}
// The background behind el: translucent layers blended down to the first opaque one.
function background(el) {
  const layers = [];
  for (; el; el = el.parentElement) {
    const m = getComputedStyle(el).backgroundColor.match(/[\d.]+/g);
    if (!m) continue;
    const a = m.length < 4 ? 1 : Number(m[3]);
    if (a > 0) { layers.push([Number(m[0]), Number(m[1]), Number(m[2]), a]); if (a >= 1) break; }
  }
  let c = [255, 255, 255];
  for (let i = layers.length - 1; i >= 0; i--) {
    const [r, g, b, a] = layers[i];
    c = [r * a + c[0] * (1 - a), g * a + c[1] * (1 - a), b * a + c[2] * (1 - a)];
  }
  return c;
}
const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (walk.nextNode()) {
  const t = walk.currentNode, el = t.parentElement;
  if (!t.textContent.trim() || el.closest("svg, [hidden], .skip")) continue;
  const st = getComputedStyle(el);
  if (st.visibility === "hidden" || st.display === "none") continue;
  const a = lum(rgb(st.color)), b = lum(background(el));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const size = parseFloat(st.fontSize), large = size >= 24 || (size >= 18.66 && Number(st.fontWeight) >= 700);
  if (ratio < (large ? 3 : 4.5)) problems.push("contrast " + ratio.toFixed(2) + ": " + t.textContent.trim().slice(0, 40));
}
if (document.documentElement.scrollWidth > window.innerWidth + 1) {
  problems.push("page wider than the window: " + document.documentElement.scrollWidth + " > " + window.innerWidth);
}
return problems;
"#;

fn check_a11y(b: &Browser, page: &str) {
    let problems = b.execute(A11Y, vec![]).expect("the checks run");
    assert_eq!(problems, Value::Array(vec![]), "accessibility problems on {page}");
}

fn shot(b: &Browser, name: &str) {
    check_a11y(b, name);
    let p = b.screenshot(name).expect("screenshot");
    assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000), "{}", p.display());
}

#[test]
fn an_admin_enrolls_edits_applies_and_rolls_back_in_the_browser() {
    let pending = Lab::start_controller(LabOptions::with_controller(&unique_prefix()))
        .expect("topology and controller");
    let ctl = pending.controller();
    let base = ctl.record().url.trim_end_matches('/').to_owned();
    let password = ctl.bootstrap_password().expect("first start").expose().to_owned();
    let b = Browser::start(
        BrowserOptions::new("admin-workflow")
            .in_netns(pending.topology().controller().expect("controller ns").name())
            .trust_ca(&ctl.record().ca_pem),
    )
    .expect("browser");

    // Logging in: the dashboard sends us to the login page and back.
    b.goto(&format!("{base}/")).expect("open the controller");
    b.wait_for_url("the login page", |u| u.contains("/login?next=/")).expect("redirected");
    shot(&b, "login");
    b.fill("#user", "admin").expect("user");
    b.fill("#password", "wrong-password").expect("password");
    b.find("form button[type=submit]").and_then(|e| e.click()).expect("submit");
    b.wait_for_text("[role=alert]", "Wrong user or password").expect("a refused login says so");
    b.fill("#user", "admin").expect("user");
    b.fill("#password", &password).expect("password");
    b.find("form button[type=submit]").and_then(|e| e.click()).expect("submit");
    b.wait_for_text("h1", "Dashboard").expect("the dashboard");
    b.wait_for_text("#dashboard", "No appliances yet").expect("an empty controller");

    // Enrolling the lab appliance: the token is shown once; the real agent uses it.
    b.find("nav a[href='/appliances/new']").and_then(|e| e.click()).expect("Enroll");
    b.wait_for_text("h1", "Enroll an appliance").expect("the form");
    shot(&b, "enroll");
    b.fill("#id", LAB_APPLIANCE).expect("id");
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("create");
    b.wait_for_text("h1", "Enrollment token for").expect("the token page");
    let token = b
        .find("#token")
        .and_then(|e| e.property("value"))
        .expect("the token")
        .as_str()
        .expect("a string")
        .to_owned();
    assert_eq!(token.len(), 43, "256 bits, base64url");
    let cmd = b.find("#cmd-enroll").and_then(|e| e.text()).expect("the command");
    assert!(cmd.contains("airlock-agent enroll") && cmd.contains(&ctl.record().ca_fingerprint));
    shot(&b, "enroll-token");
    let lab = pending.enroll(&token).expect("the agent enrolls with the token from the page");
    let mut api = lab.api().expect("api");
    let before = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("enrolled, everything dropped");

    b.goto(&format!("{base}/")).expect("dashboard");
    b.wait_for_text("#dashboard table", "enforcing").expect("the appliance enforcing");

    // A policy with an error: shown next to its line, nothing applied.
    b.find("nav a[href='/policy']").and_then(|e| e.click()).expect("Policy");
    b.wait_for_text("main", "No policy has been applied").expect("no policy yet");
    b.find("a[href='/policy/edit']").and_then(|e| e.click()).expect("Write the first policy");
    b.wait_for("#policy-text").expect("the editor");
    let broken = LAB_POLICY.replace("hosts = [\"p1\"]", "hosts = [\"p9\"]");
    assert_ne!(broken, LAB_POLICY);
    set_policy_text(&b, &broken);
    b.fill("#comment", "open imaging to the regional lab").expect("why");
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("check");
    let alert = b.wait_for_text("#problems", "nothing was applied").expect("the problems");
    assert!(alert.text().expect("text").contains("p9"), "names the unknown host");
    let marked = b.find(".listing li.bad").and_then(|e| e.text()).expect("the marked line");
    assert!(marked.contains("p9"), "the offending line is marked: {marked}");
    b.find(".listing li.problem").expect("the problem sits under its line");
    shot(&b, "policy-error");
    let unchanged = api.appliance(LAB_APPLIANCE).expect("view");
    assert_eq!(unchanged.desired_version, before.desired_version, "nothing was applied");

    // Fixed: the diff says what opens where; applying converges the appliance.
    set_policy_text(&b, LAB_POLICY);
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("check");
    let diff = b.wait_for_text("#diff", "Opens:").expect("the diff").text().expect("text");
    assert!(
        diff.contains(LAB_APPLIANCE) && diff.contains("10.77.0.11 -> 10.78.0.100:443/tcp"),
        "{diff}"
    );
    shot(&b, "policy-diff");
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("apply");
    b.wait_for_url("version 1", |u| u.ends_with("/policy/versions/1?applied=1")).expect("applied");
    wait_converged(&b);
    shot(&b, "policy-applied");
    let v1 = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("applied");
    let flows = |v: &airlock_testbed::ApplianceView| v.health.as_ref().map_or(0, |h| h.flows);
    assert!(flows(&v1) > flows(&before), "the flow opened: {} → {}", flows(&before), flows(&v1));

    // A second version closes the flow; the rollback reopens it.
    b.goto(&format!("{base}/policy/edit")).expect("editor");
    let closed = &LAB_POLICY[..LAB_POLICY.find("[[flow]]").expect("a flow")];
    set_policy_text(&b, closed);
    b.fill("#comment", "close imaging for maintenance").expect("why");
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("check");
    b.wait_for_text("#diff", "Closes:").expect("the diff closes the flow");
    b.find("form.stack button[type=submit]").and_then(|e| e.click()).expect("apply");
    b.wait_for_url("version 2", |u| u.ends_with("/policy/versions/2?applied=1")).expect("applied");
    wait_converged(&b);
    let v2 = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("applied");
    assert_eq!(flows(&v2), flows(&before), "closed again");

    b.find("nav a[href='/policy/versions']").and_then(|e| e.click()).expect("History");
    b.wait_for_text("table", "close imaging for maintenance").expect("who/when/why");
    shot(&b, "history");
    b.find("a[href='/policy/versions/1']").and_then(|e| e.click()).expect("version 1");
    b.find("a[href='/policy/versions/1/rollback']").and_then(|e| e.click()).expect("review");
    let review = b.wait_for_text("#diff", "Opens:").expect("what the rollback opens");
    assert!(review.text().expect("text").contains("10.77.0.11 -> 10.78.0.100:443/tcp"));
    b.wait_for_text("#rb-h", "Roll back to version 1").expect("the rollback form");
    b.fill("#rb-comment", "maintenance over").expect("why");
    shot(&b, "rollback");
    b.find("#rb-comment").and_then(|e| e.submit()).expect("roll back");
    b.wait_for_url("version 3", |u| u.ends_with("/policy/versions/3?applied=1"))
        .expect("rolled back");
    wait_converged(&b);
    let v3 = api.wait_applied(LAB_APPLIANCE, CONVERGE).expect("applied");
    assert_eq!(flows(&v3), flows(&v1), "the flow is back");

    // Some traffic for the charts and the drop list: p2 is refused (default deny).
    let t = lab.topology();
    let to = SocketAddr::new(IpAddr::V4(addr::EXT_V4), 443);
    for _ in 0..5 {
        let ok =
            t.p2().run(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok());
        assert!(!ok.expect("netns"), "p2 is not in the policy");
    }
    api.wait_for(LAB_APPLIANCE, "p2's drops reported", CONVERGE, |v| {
        is_applied(v) && v.health.as_ref().is_some_and(|h| !h.recent_drops.is_empty())
    })
    .expect("drops reported");
    b.goto(&format!("{base}/appliances/{LAB_APPLIANCE}")).expect("detail");
    b.wait_for_text("#ports-h + div", "patient0").expect("ports and roles");
    let drops = b.wait_for_text("#drops-h + div", "default deny").expect("the drop and its cause");
    assert!(drops.text().expect("text").contains(&addr::P2_V4.to_string()));
    b.wait_for("#wg-key").expect("the WireGuard public key");
    shot(&b, "appliance");
    b.goto(&format!("{base}/")).expect("dashboard");
    b.wait_for_text("#dashboard table", "up to date").expect("converged on the dashboard");
    b.wait_until("a chart line", CONVERGE, || {
        Ok(b.find_all("#dashboard polyline")?.first().map(|_| ()))
    })
    .expect("rates drawn");
    shot(&b, "dashboard");
    b.find("nav a[href='/services']").and_then(|e| e.click()).expect("Services");
    b.wait_for_text("main", "regional-lab").expect("the lab's service");
    shot(&b, "services");

    // Keyboard: the first Tab reaches the skip link, which leads to the content.
    b.goto(&format!("{base}/")).expect("dashboard");
    b.wait_for_text("h1", "Dashboard").expect("dashboard");
    b.find("body").and_then(|e| e.type_text("\u{E004}")).expect("Tab");
    let focused = b.execute("return document.activeElement.className", vec![]).expect("focus");
    assert_eq!(focused, Value::from("skip"), "the skip link comes first");
    b.close().expect("browser closes cleanly");

    // A tablet in portrait: the same pages fit its width.
    let t = Browser::start(
        BrowserOptions { window: (768, 1024), ..BrowserOptions::new("admin-workflow-tablet") }
            .in_netns(lab.topology().controller().expect("controller ns").name())
            .trust_ca(&lab.controller().expect("controller").record().ca_pem),
    )
    .expect("tablet browser");
    t.goto(&format!("{base}/login")).expect("login");
    t.fill("#user", "admin").expect("user");
    t.fill("#password", &password).expect("password");
    t.find("form button[type=submit]").and_then(|e| e.click()).expect("submit");
    t.wait_for_text("h1", "Dashboard").expect("the dashboard");
    for (path, h1) in [
        ("/".to_owned(), "Dashboard"),
        (format!("/appliances/{LAB_APPLIANCE}"), "Appliance"),
        ("/policy".to_owned(), "Policy"),
        ("/policy/edit".to_owned(), "Edit the policy"),
        ("/policy/versions".to_owned(), "Policy history"),
        ("/services".to_owned(), "External services"),
    ] {
        t.goto(&format!("{base}{path}")).expect("page");
        t.wait_for_text("h1", h1).expect("the page");
        check_a11y(&t, &format!("{path} at 768 px"));
    }
    t.goto(&format!("{base}/")).expect("dashboard");
    t.wait_for_text("h1", "Dashboard").expect("dashboard");
    shot(&t, "dashboard-tablet");
    t.close().expect("browser closes cleanly");
}
