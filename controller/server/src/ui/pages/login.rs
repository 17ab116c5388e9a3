//! Log in and out.

use axum::{
    extract::{Query, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Redirect, Response},
    Form,
};
use maud::html;
use serde::Deserialize;

use crate::{
    api::session_cookie,
    auth::AuthError,
    ui::{layout, PageErr, St, Viewer},
};

/// `?next=` and `?ended=` on the login page.
#[derive(Debug, Deserialize, Default)]
pub struct LoginQuery {
    next: Option<String>,
    ended: Option<String>,
}

/// Only local paths: never an open redirect.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

fn login_page(
    st: &crate::state::AppState,
    next: &str,
    message: Option<(&str, &str)>,
) -> maud::Markup {
    layout::bare_with(
        "Sign in to Airlock",
        html! {
            @if let Some((class, text)) = message {
                p class={ "notice " (class) } role="alert" { (text) }
            }
            form.stack method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                div {
                    label for="user" { "User" }
                    input #user type="text" name="user" autocomplete="username" required autofocus;
                }
                div {
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                }
                div.actions { button type="submit" { "Sign in" } }
            }
            p.hint {
                "Check that your browser shows a valid certificate for this controller. "
                "Its CA fingerprint is "
                code.mono { (st.ca.fingerprint()) } "."
            }
        },
    )
}

/// `GET /login`.
pub async fn form(State(st): St, Query(q): Query<LoginQuery>) -> impl IntoResponse {
    let next = safe_next(q.next.as_deref());
    let msg = q.ended.is_some().then_some((
        "warn",
        "Your session ended (automatic log-off after inactivity). Sign in again.",
    ));
    login_page(&st, &next, msg)
}

/// The login form.
#[derive(Deserialize)]
pub struct LoginForm {
    user: String,
    password: String,
    #[serde(default)]
    next: String,
}

impl std::fmt::Debug for LoginForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginForm").field("user", &self.user).finish_non_exhaustive()
    }
}

/// `POST /login`.
pub async fn submit(State(st): St, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(Some(&f.next));
    let st2 = st.clone();
    let now = st.now();
    let user = f.user.clone();
    let r = tokio::task::spawn_blocking(move || {
        st2.sessions.login(&st2.store, &user, &f.password, now)
    })
    .await;
    match r {
        Ok(Ok(s)) => {
            tracing::info!(user = %f.user, "web UI login");
            let mut resp = Redirect::to(&next).into_response();
            if let Ok(v) =
                HeaderValue::from_str(&session_cookie(&s.token, s.expires_at.saturating_sub(now)))
            {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Ok(Err(AuthError::Refused)) => {
            st.metrics.logins_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(user = %f.user, "web UI login refused");
            (
                StatusCode::UNAUTHORIZED,
                login_page(&st, &next, Some(("bad", "Wrong user or password."))),
            )
                .into_response()
        }
        Ok(Err(e)) => PageErr::internal("login failed", &e).into_response(),
        Err(e) => PageErr::internal("login task failed", &e).into_response(),
    }
}

/// A form with only the anti-forgery token.
#[derive(Debug, Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

/// `POST /logout`.
pub async fn logout(
    State(st): St,
    v: Viewer,
    headers: axum::http::HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PageErr> {
    v.check_csrf(&f.csrf)?;
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    parts.headers = headers;
    if let Some(t) = super::super::session_token(&parts) {
        st.sessions.logout(&t);
    }
    tracing::info!(user = %v.subject.user, "web UI logout");
    let mut resp = Redirect::to("/login").into_response();
    if let Ok(h) = HeaderValue::from_str(&session_cookie("", 0)) {
        resp.headers_mut().insert(header::SET_COOKIE, h);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_always_local() {
        assert_eq!(safe_next(Some("/policy")), "/policy");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
