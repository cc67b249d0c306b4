//! kiln's browser pages: the playground (`/`), the console (`/console`) and
//! the API reference (`/docs`), with their assets (`/assets/...`).
//!
//! The pages are built from `web/` by Vite (`npm ci && npm run build`, which
//! `scripts/serve` and `scripts/test` run) into `web/dist`, and that folder is
//! embedded into the binary at compile time, so a release binary serves them
//! with no file beside it. A binary compiled before the assets were built
//! still compiles and serves a page saying how to build them.
//!
//! Every response carries a strict Content-Security-Policy: scripts, styles,
//! fonts and requests only from this server, no inline script or style, no
//! plugins, no framing of the pages. The playground renders HTML outputs in
//! `srcdoc` iframes sandboxed without `allow-same-origin`; those documents
//! inherit this policy, so markup a cell printed cannot run inline script,
//! and whatever script does run there has an opaque origin that reaches
//! neither the page's storage (the API key) nor its DOM.
#![forbid(unsafe_code)]

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The built pages and assets (`web/dist`); empty when they were not built.
#[derive(rust_embed::Embed)]
#[folder = "../../web/dist"]
#[allow_missing = true]
struct Dist;

/// The policy of every page: nothing from elsewhere, nothing inline.
/// `img-src data:` is for the images cells produce (PNG, SVG as images, which
/// cannot run script); `blob:` is for file downloads.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One of the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The notebook-like playground, at `/`.
    Playground,
    /// Sessions, usage, server health and keys, at `/console`.
    Console,
    /// The API reference rendering `/openapi.json`, at `/docs`.
    Docs,
}

impl Page {
    fn file(self) -> &'static str {
        match self {
            Page::Playground => "index.html",
            Page::Console => "console.html",
            Page::Docs => "docs.html",
        }
    }
}

/// Whether this binary was compiled with the built pages.
pub fn built() -> bool {
    Dist::get(Page::Playground.file()).is_some()
}

/// The routes of the playground, the console and the assets. `/docs` is the
/// OpenAPI module's (it documents itself), which answers with [`page`].
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { page(Page::Playground, &h) }))
        .route("/console", get(|h: HeaderMap| async move { page(Page::Console, &h) }))
        .route("/assets/{*path}", get(asset))
}

/// A page, or the "not built" page when the binary has no assets.
pub fn page(page: Page, request: &HeaderMap) -> Response {
    match Dist::get(page.file()) {
        Some(file) => serve(file, "text/html; charset=utf-8", "no-cache", request),
        None => with_headers(
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], NOT_BUILT).into_response(),
        ),
    }
}

async fn asset(Path(path): Path<String>, request: HeaderMap) -> Response {
    let name = format!("assets/{path}");
    let Some(file) = Dist::get(&name) else {
        return with_headers((StatusCode::NOT_FOUND, "no such asset\n").into_response());
    };
    // Vite names every asset by its content hash, except the script of the
    // output frames, which the playground loads by a fixed name.
    let cache = if name == "assets/frame.js" { "no-cache" } else { "public, max-age=31536000, immutable" };
    let mime = file.metadata.mimetype();
    let content_type = match mime {
        "application/javascript" | "text/javascript" => "text/javascript; charset=utf-8".to_string(),
        m if m.starts_with("text/") => format!("{m}; charset=utf-8"),
        m => m.to_string(),
    };
    serve(file, &content_type, cache, &request)
}

fn serve(file: rust_embed::EmbeddedFile, content_type: &str, cache: &str, request: &HeaderMap) -> Response {
    let hash = file.metadata.sha256_hash();
    let etag = format!("\"{}\"", hash[..16].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let fresh = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|t| {
            let t = t.trim();
            t == etag || t.strip_prefix("W/") == Some(etag.as_str()) || t == "*"
        })
    });
    let mut resp =
        if fresh { StatusCode::NOT_MODIFIED.into_response() } else { file.data.into_owned().into_response() };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(cache) {
        headers.insert(header::CACHE_CONTROL, v);
    }
    with_headers(resp)
}

/// The security headers every response of this module carries.
fn with_headers(mut resp: Response) -> Response {
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    resp
}

const NOT_BUILT: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kiln</title></head>
<body>
<h1>kiln</h1>
<p>The playground was not built into this kiln binary. Run <code>scripts/serve</code> (it builds the
pages, then kiln), or build them yourself with <code>scripts/build-web</code> (which runs
<code>npm ci</code> and <code>npm run build</code> in <code>web/</code>) and rebuild kiln.</p>
<p>The API itself works: its description is at <a href="/openapi.json">/openapi.json</a>.</p>
</body></html>
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = router::<()>().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn every_page_carries_the_strict_policy_and_says_how_to_build_when_not_built() {
        for path in ["/", "/console"] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
            if built() {
                assert!(body.contains("<script type=\"module\""), "{body}");
                assert!(!body.contains("<script>"), "inline script in {path}");
            } else {
                assert!(body.contains("The playground was not built"), "{body}");
            }
        }
        let policy = CONTENT_SECURITY_POLICY;
        assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self';"));
        assert!(!policy.contains("unsafe") && !policy.contains("http"), "{policy}");
    }

    #[tokio::test]
    async fn an_unchanged_page_answers_not_modified_and_unknown_assets_are_not_found() {
        let (_, headers, _) = get("/", &[]).await;
        if let Some(etag) = headers.get(header::ETAG) {
            let (status, _, body) = get("/", &[("if-none-match", etag.to_str().unwrap())]).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED);
            assert!(body.is_empty());
        }
        for path in ["/assets/nope.js", "/assets/../Cargo.toml", "/assets/%2e%2e/index.html"] {
            let (status, headers, _) = get(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }

    #[tokio::test]
    async fn built_assets_are_served_with_their_type_and_the_frame_script_by_its_fixed_name() {
        if !built() {
            return;
        }
        let (status, headers, body) = get("/assets/frame.js", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        assert!(body.contains("frame-height"));
        let css = Dist::iter().find(|n| n.ends_with(".css")).expect("a stylesheet");
        let (status, headers, _) = get(&format!("/{css}"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
        assert!(headers[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
    }
}
