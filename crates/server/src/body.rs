//! Request bodies: read with a size bound, parsed as JSON, and turned into
//! the API's errors when they are too large, empty or malformed.
//!
//! Handlers take a [`BoundedJson<T>`] instead of reading and parsing bodies
//! themselves, so every endpoint answers the same way: 413
//! `payload_too_large` past `--max-body-bytes`, 400 `invalid_request` with
//! the field at fault and the shape the endpoint expects otherwise. Axum's
//! own `Json` extractor would answer such requests in plain text.

use crate::state::AppState;
use axum::body::Body;
use axum::extract::{FromRequest, Request};
use kiln_protocol::{ApiError, BatchRequest, CreateKey, ErrorCode, ExecuteRequest, UploadRequest};
use serde::de::DeserializeOwned;

/// A request body the endpoint can describe to a caller who got it wrong.
pub(crate) trait Described: DeserializeOwned {
    /// What the body is, e.g. "an execute request".
    const WHAT: &'static str;
    /// The expected shape, in a sentence.
    const SHAPE: &'static str;
}

impl Described for ExecuteRequest {
    const WHAT: &'static str = "an execute request";
    const SHAPE: &'static str = "required: \"code\" (string); optional: \"language\", \"session_id\", \"files\", \
                                 \"timeout\"; e.g. {\"language\": \"python\", \"code\": \"print(1)\"}";
}

impl Described for BatchRequest {
    const WHAT: &'static str = "a batch";
    const SHAPE: &'static str = "{\"items\": [{\"code\": \"...\", \"tests\": [{\"stdin\": \"...\", \"expected_stdout\":                                  \"...\"} or {\"code\": \"assert ...\"}], \"tests_timeout\", \"timeout\", \"memory_limit\",                                  \"keep_session\", \"session_id\", \"files\"}] (1 to 1,000 items)}";
}

impl Described for UploadRequest {
    const WHAT: &'static str = "an upload request";
    const SHAPE: &'static str = "{\"files\": [{\"name\", \"encoding\", \"content\"}]}";
}

impl Described for CreateKey {
    const WHAT: &'static str = "a key to create";
    const SHAPE: &'static str =
        "{\"label\", \"admin\", \"network\", \"max_sessions\", \"max_executions_per_key\"}, all \
                                 optional: send {} for the defaults";
}

/// A JSON body of at most `--max-body-bytes`, parsed as `T`.
#[derive(Debug)]
pub(crate) struct BoundedJson<T>(pub T);

impl<T: Described> FromRequest<AppState> for BoundedJson<T> {
    type Rejection = crate::AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req.into_body(), state.max_body_bytes).await?;
        Ok(BoundedJson(parse::<T>(&bytes)?))
    }
}

/// Read at most `limit` bytes of body. Past the limit the rest is read and
/// discarded (up to a bound) before answering 413: a server that answers
/// while the client is still sending makes most HTTP clients report a reset
/// connection instead of the error.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    const DRAIN_MAX: usize = 1 << 30;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "the request body could not be read"));
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_MAX {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body ({seen} bytes or more) is larger than this server's limit of {limit} bytes; \
                 send fewer or smaller files"
            ),
        ));
    }
    Ok(buf.freeze())
}

/// Parse a body, turning serde's messages into actionable ones.
pub(crate) fn parse<T: Described>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the request body is empty: send a JSON object ({})", T::SHAPE),
        ));
    }
    // Every body is a JSON object; serde would also build a struct whose
    // fields all have defaults from an array (`[]`).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde_json::Value>(bytes).is_ok()
    {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the request body is not a JSON object: send {} ({})", T::WHAT, T::SHAPE),
        ));
    }
    // Parsed with its path kept, so a bad value names its field
    // (`max_executions_per_key`, `items[3].timeout`).
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes)).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        let text = e.to_string();
        let param = text
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string)
            .or_else(|| (!e.is_syntax() && !e.is_eof() && path != ".").then_some(path));
        let msg = if e.is_syntax() || e.is_eof() {
            format!("the request body is not valid JSON ({text})")
        } else {
            format!("the request body is not {} ({text}); {}", T::WHAT, T::SHAPE)
        };
        let err = ApiError::new(ErrorCode::InvalidRequest, msg);
        match param {
            Some(p) => err.with_param(p),
            None => err,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_is_not_an_object_is_refused_even_when_every_field_has_a_default() {
        for body in [&b"[]"[..], b" [ ] ", b"null", b"3", b"\"x\""] {
            let e = parse::<kiln_protocol::CreateKey>(body).err().map(|e| e.message).unwrap_or_default();
            assert!(e.contains("not a JSON object"), "{e}");
        }
        assert!(parse::<kiln_protocol::CreateKey>(b" {} ").is_ok());
    }

    #[test]
    fn a_bad_value_names_its_field() {
        for body in [&br#"{"max_executions_per_key": 0}"#[..], br#"{"max_executions_per_key": "four"}"#] {
            let e = parse::<kiln_protocol::CreateKey>(body).err().unwrap_or_else(|| panic!("accepted"));
            assert_eq!(e.param.as_deref(), Some("max_executions_per_key"), "{}", e.message);
            assert!(e.message.contains("whole number from 1"), "{}", e.message);
        }
        let ok = parse::<kiln_protocol::CreateKey>(br#"{"max_executions_per_key": 3}"#).ok();
        assert_eq!(ok.and_then(|k| k.max_executions_per_key), Some(3));
    }

    #[test]
    fn a_missing_field_is_named_and_the_shape_explained() {
        let e = parse::<ExecuteRequest>(br#"{"language": "python"}"#).err().map(|e| (e.param, e.message));
        let (param, message) = e.unwrap_or_default();
        assert_eq!(param.as_deref(), Some("code"));
        assert!(message.contains("required: \"code\""), "{message}");
    }

    #[test]
    fn empty_and_broken_bodies_say_what_is_wrong() {
        let empty = parse::<UploadRequest>(b"  \n").err().map(|e| e.message).unwrap_or_default();
        assert!(empty.contains("empty") && empty.contains("files"), "{empty}");
        let broken = parse::<ExecuteRequest>(b"{\"code\": ").err().map(|e| e.message).unwrap_or_default();
        assert!(broken.contains("not valid JSON"), "{broken}");
    }
}
