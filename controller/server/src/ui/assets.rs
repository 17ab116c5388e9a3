//! The UI's static assets, compiled into the binary and served under
//! content-hashed names (`/assets/app-1a2b3c4d5e6f.css`) so browsers may
//! cache them for a year: a new build has new names.

use std::sync::OnceLock;

use axum::{
    extract::Path,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use sha2::{Digest, Sha256};

use crate::state::AppState;

struct Asset {
    stem: &'static str,
    ext: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        stem: "app",
        ext: "css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        stem: "app",
        ext: "js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        stem: "favicon",
        ext: "svg",
        mime: "image/svg+xml",
        body: include_bytes!("assets/favicon.svg"),
    },
];

fn names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.body);
                let h: String = d[..6].iter().map(|b| format!("{b:02x}")).collect();
                format!("{}-{h}.{}", a.stem, a.ext)
            })
            .collect()
    })
}

/// The URL of an asset by its stem and extension (`url("app", "css")`).
pub fn url(stem: &str, ext: &str) -> String {
    ASSETS
        .iter()
        .zip(names())
        .find(|(a, _)| a.stem == stem && a.ext == ext)
        .map_or_else(String::new, |(_, n)| format!("/assets/{n}"))
}

async fn serve(Path(name): Path<String>) -> Response {
    match ASSETS.iter().zip(names()).find(|(_, n)| **n == name) {
        Some((a, _)) => (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

/// `/assets/{name}`.
pub fn router() -> Router<std::sync::Arc<AppState>> {
    Router::new().route("/assets/{name}", get(serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_content_hash() {
        let css = url("app", "css");
        assert!(css.starts_with("/assets/app-") && css.ends_with(".css"), "{css}");
        assert_eq!(css.len(), "/assets/app-".len() + 12 + ".css".len());
        assert_eq!(url("nope", "css"), "");
    }
}
