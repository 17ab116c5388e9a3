//! The web UI over the controller's real router (in-process requests to the
//! same service the TLS listener serves): sessions, the anti-forgery token,
//! the CSP, cached assets, and the policy workflow's refusals. The browser
//! tests (tests/tests/browser.rs) drive the same pages in Chromium.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::{body::Body, http::Request};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use airlock_controller::run::Started;

struct Ui {
    _dir: tempfile::TempDir,
    started: Started,
    cookie: String,
    csrf: String,
}

struct Resp {
    status: u16,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, h: &str) -> &str {
        self.headers.get(h).map_or("", |v| v.to_str().unwrap())
    }
}

fn enc(s: &str) -> String {
    airlock_controller::ui::url_encode(s).replace('/', "%2F")
}

fn form(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

async fn send(st: &Started, req: Request<Body>) -> Resp {
    let app = airlock_controller::server::main_app(st.state.clone());
    let r = app.oneshot(req).await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Resp { status, headers, body }
}

fn csrf_of(page: &str) -> String {
    let i = page.find("name=\"csrf\" value=\"").expect("a form with a csrf token") + 19;
    page[i..i + page[i..].find('"').unwrap()].to_owned()
}

impl Ui {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let started = common::start(common::config(dir.path().into())).await;
        let pw = started.bootstrap.clone().unwrap();
        let mut ui = Ui { _dir: dir, started, cookie: String::new(), csrf: String::new() };
        let r =
            ui.post("/login", &form(&[("user", "admin"), ("password", &pw), ("next", "/")])).await;
        assert_eq!(r.status, 303, "{}", r.body);
        let set = r.header("set-cookie").to_owned();
        for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
            assert!(set.contains(attr), "{set}");
        }
        ui.cookie = set.split(';').next().unwrap().to_owned();
        let home = ui.get("/").await;
        assert_eq!(home.status, 200);
        ui.csrf = csrf_of(&home.body);
        ui
    }

    async fn get(&self, path: &str) -> Resp {
        let mut b = Request::get(path);
        if !self.cookie.is_empty() {
            b = b.header("cookie", &self.cookie);
        }
        send(&self.started, b.body(Body::empty()).unwrap()).await
    }

    async fn post(&self, path: &str, body: &str) -> Resp {
        self.post_with(path, body, &[]).await
    }

    async fn post_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
        if !self.cookie.is_empty() {
            b = b.header("cookie", &self.cookie);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        send(&self.started, b.body(Body::from(body.to_owned())).unwrap()).await
    }
}

fn lab_policy() -> String {
    common::lab_policy_text()
}

#[tokio::test]
async fn pages_need_a_session_and_carry_a_strict_csp() {
    let ui = Ui::start().await;
    let anon = Ui { cookie: String::new(), ..Ui::start().await };
    let r = anon.get("/policy").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "/login?next=/policy");
    let live = send(
        &anon.started,
        Request::get("/ui/live/dashboard")
            .header("x-airlock-live", "1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(live.status, 401, "a background refresh is told, not redirected");
    let wrong = anon.post("/login", &form(&[("user", "admin"), ("password", "nope")])).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong user or password."));
    assert!(wrong.header("set-cookie").is_empty());
    let open_redirect = anon
        .post(
            "/login",
            &form(&[("user", "admin"), ("password", "nope"), ("next", "//evil.example")]),
        )
        .await;
    assert!(!open_redirect.body.contains("evil.example"), "next is dropped when not local");

    let home = ui.get("/").await;
    let csp = home.header("content-security-policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(home.header("x-frame-options"), "DENY");
    assert!(!home.body.contains("style=\""), "no inline style anywhere");
    assert!(!home.body.contains("<script>"), "no inline script anywhere");
    assert!(home.body.contains("No appliances yet."));

    // Assets: versioned names, cached for a year; unknown names are 404.
    let i = home.body.find("/assets/app-").unwrap();
    let css = &home.body[i..i + home.body[i..].find('"').unwrap()];
    let a = ui.get(css).await;
    assert_eq!(a.status, 200);
    assert!(a.header("cache-control").contains("immutable"), "{}", a.header("cache-control"));
    assert!(a.header("content-type").starts_with("text/"));
    assert_eq!(ui.get("/assets/app-000000000000.css").await.status, 404);

    // Log out: the cookie is cleared and the session is gone.
    let out = ui.post("/logout", &form(&[("csrf", &ui.csrf)])).await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(ui.get("/").await.status, 303, "the old cookie no longer works");
}

#[tokio::test]
async fn forms_need_the_anti_forgery_token_and_a_same_origin_post() {
    let ui = Ui::start().await;
    let body = |csrf: &str| form(&[("csrf", csrf), ("id", "ward-7"), ("ttl_hours", "24")]);
    let r = ui.post("/appliances", &body("forged")).await;
    assert_eq!(r.status, 403);
    assert!(ui.started.state.appliances.get("ward-7").unwrap().is_none(), "nothing created");
    let r = ui.post_with("/appliances", &body(&ui.csrf), &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(r.status, 403);
    assert!(ui.started.state.appliances.get("ward-7").unwrap().is_none(), "nothing created");

    let r =
        ui.post_with("/appliances", &body(&ui.csrf), &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Shown once."));
    assert!(r.body.contains("airlock-agent enroll --controller"));
    assert!(r.body.contains("cargo xtask image provision"));
    assert_eq!(r.header("cache-control"), "no-store", "the token page is never cached");
    assert!(ui.started.state.appliances.get("ward-7").unwrap().is_some());

    let bad = ui
        .post("/appliances", &form(&[("csrf", &ui.csrf), ("id", "Ward 7!"), ("ttl_hours", "24")]))
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains("aria-invalid=\"true\""), "the field is marked");
    assert!(bad.body.contains("is invalid"), "{}", bad.body);

    let detail = ui.get("/appliances/ward-7").await;
    assert_eq!(detail.status, 200);
    assert!(detail.body.contains("pending"));
    assert_eq!(ui.get("/appliances/nope").await.status, 404);
}

#[tokio::test]
async fn a_bad_policy_is_shown_with_its_problems_and_nothing_is_applied() {
    let ui = Ui::start().await;
    let good = lab_policy();
    let bad = good.replace("port = 443\n", "port = 443\nbogus = true\n");
    assert_ne!(good, bad);
    let r = ui
        .post("/policy/preview", &form(&[("csrf", &ui.csrf), ("text", &bad), ("base", "")]))
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("nothing was applied"), "{}", r.body);
    assert!(r.body.contains("class=\"bad\""), "the offending line is marked");
    assert!(r.body.contains("bogus"));
    assert_eq!(ui.started.state.policies.current_version().unwrap(), None);

    let r = ui
        .post("/policy/preview", &form(&[("csrf", &ui.csrf), ("text", &good), ("base", "")]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Opens:"));
    assert!(r.body.contains("Apply version 1"));
    assert_eq!(
        ui.started.state.policies.current_version().unwrap(),
        None,
        "a preview applies nothing"
    );

    let no_why =
        ui.post("/policy/apply", &form(&[("csrf", &ui.csrf), ("text", &good), ("base", "")])).await;
    assert_eq!(no_why.status, 422);
    assert_eq!(ui.started.state.policies.current_version().unwrap(), None);

    let ok = ui
        .post(
            "/policy/apply",
            &form(&[("csrf", &ui.csrf), ("text", &good), ("base", ""), ("comment", "first")]),
        )
        .await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.header("location"), "/policy/versions/1?applied=1");

    // Someone else's change in between: refused, shown again against the new version.
    let stale = ui
        .post(
            "/policy/apply",
            &form(&[("csrf", &ui.csrf), ("text", &good), ("base", ""), ("comment", "again")]),
        )
        .await;
    assert_eq!(stale.status, 200);
    assert!(stale.body.contains("Someone applied version 1"), "{}", stale.body);
    assert_eq!(ui.started.state.policies.current_version().unwrap(), Some(1));

    let v2 = good.replace("2030-01-01T00:00:00Z", "2029-06-01T00:00:00Z");
    let ok = ui
        .post(
            "/policy/apply",
            &form(&[("csrf", &ui.csrf), ("text", &v2), ("base", "1"), ("comment", "end sooner")]),
        )
        .await;
    assert_eq!(ok.header("location"), "/policy/versions/2?applied=1");
    let page = ui.get("/policy/versions/1").await;
    assert!(page.body.contains("/policy/versions/1/rollback"));
    let review = ui.get("/policy/versions/1/rollback").await;
    assert_eq!(review.status, 200);
    assert!(
        review.body.contains("Roll back to version 1") && review.body.contains("Changes:"),
        "{}",
        review.body
    );
    let no_why =
        ui.post("/policy/rollback", &form(&[("csrf", &ui.csrf), ("to_version", "1")])).await;
    assert_eq!(no_why.status, 400);
    let rb = ui
        .post(
            "/policy/rollback",
            &form(&[("csrf", &ui.csrf), ("to_version", "1"), ("comment", "needed longer")]),
        )
        .await;
    assert_eq!(rb.header("location"), "/policy/versions/3?applied=1");
    let hist = ui.get("/policy/versions").await;
    assert!(
        hist.body.contains("needed longer") && hist.body.contains("(rollback to 1)"),
        "{}",
        hist.body
    );
}

#[tokio::test]
async fn registering_a_service_is_a_checked_policy_change() {
    let ui = Ui::start().await;
    let first = ui
        .post(
            "/policy/apply",
            &form(&[
                ("csrf", &ui.csrf),
                ("text", &lab_policy()),
                ("base", ""),
                ("comment", "first"),
            ]),
        )
        .await;
    assert_eq!(first.status, 303);
    let svc = |key: &str| {
        form(&[
            ("csrf", &ui.csrf),
            ("name", "radiology-archive"),
            ("endpoint", "192.0.2.50:51820"),
            ("public_key", key),
            ("addresses", "192.0.2.50"),
            ("ports", "tcp/443"),
            ("data_use", "Image archive"),
        ])
    };
    let bad = ui.post("/services/preview", &svc("not-a-key")).await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.body.contains("id=\"svc-public_key-err\""),
        "the error sits at the key field: {}",
        bad.body
    );
    let ok =
        ui.post("/services/preview", &svc("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("register external service radiology-archive"));
    assert_eq!(ui.started.state.policies.current_version().unwrap(), Some(1), "only previewed");
    let list = ui.get("/services").await;
    assert!(list.body.contains("regional-lab"));
}

#[tokio::test]
async fn image_state_shows_on_the_appliance_page_the_updates_page_and_as_alarms() {
    use airlock_proto::{
        agent::{Health, Report},
        release::{ReleaseState, UpdateFailure},
    };
    let ui = Ui::start().await;
    let st = &ui.started.state;
    let now = st.now();
    let (token, _) = st.appliances.create("ward-5", None, now).unwrap();
    let (_key, csr) = common::key_and_csr();
    st.appliances.enroll(&st.ca, &st.registry, &token, &csr, now).unwrap();
    let report = Report {
        health: Health { enforcing: true, ..Health::default() },
        release: Some(ReleaseState {
            release: 6,
            slot: "b".into(),
            on_trial: true,
            failed_trials: vec![4],
            in_progress: None,
            pending: Some(7),
            last_failure: Some(UpdateFailure {
                release: 5,
                reason: "the download's SHA-256 differs".into(),
                at: now - 30,
            }),
        }),
        ..Report::default()
    };
    st.hub.report("ward-5", report, now);

    let r = ui.get("/appliances/ward-5").await;
    assert_eq!(r.status, 200, "{}", r.body);
    for want in
        ["id=\"image-h\"", "on trial", "the download's SHA-256 differs", "not in the rollout"]
    {
        assert!(r.body.contains(want), "{want}: {}", r.body);
    }
    let r = ui.get("/").await;
    assert!(
        r.body.contains("image update to release 5 failed: the download's SHA-256 differs"),
        "{}",
        r.body
    );
    assert!(r.body.contains("href=\"/updates\""), "linked in the navigation");
    let r = ui.get("/updates").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-security-policy").contains("default-src 'none'"));
    for want in ["No rollout", "No release uploaded yet", "uploads off", "ward-5"] {
        assert!(r.body.contains(want), "{want}: {}", r.body);
    }
}
