//! Uploaded files: their wire shape and the pure checks that make a name safe.
//!
//! A name is relative to the session's working directory and may contain
//! sub-folders (`data/raw.csv`). Everything that could leave that directory
//! or confuse the filesystem is refused here, before any byte is written:
//! absolute names, `..`, NUL bytes, over-long names, and two entries of one
//! request that would overwrite each other. What this cannot see (a folder or
//! a symlink already in the working directory) is checked where the files
//! are written, without following links.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Longest accepted path component in bytes, as on Linux filesystems.
const MAX_COMPONENT: usize = 255;
/// Longest accepted relative name, in characters (at most 4 KiB of UTF-8).
const MAX_NAME: usize = 1024;

/// The ways a component can name something (not empty, `.` or `..`), at
/// most 255 characters, as alternatives for [`NAME_PATTERN`] and
/// [`PATH_PATTERN`]. With an argument, the class of its first character
/// (the first component's, which must not start with `\` either).
macro_rules! real_component {
    () => {
        real_component!(r"[^/.\x00]")
    };
    ($first:literal) => {
        concat!($first, r"[^/\x00]{0,254}|\.[^/.\x00][^/\x00]{0,253}|\.\.[^/\x00]{1,253}")
    };
}

/// Any component but `..` after a `/`: empty, `.` or a real one.
macro_rules! later_component {
    () => {
        concat!(r"(?:/(?:\.|", real_component!(), ")?)")
    };
}

/// The rules of a name, as a regular expression (for the OpenAPI document:
/// a schema-valid name is one this module accepts). Not absolute, no NUL,
/// no `..` component, and at least one component that is not empty or `.`.
///
/// Spelled without lookarounds, component by component: a first component
/// that is a real name (and does not start with `\`), or `.` followed later
/// by a real one, then any components but `..`; each component at most 255
/// characters (the 255 bytes the code counts are the same for ASCII; a
/// pattern cannot count UTF-8 bytes, so the description says it).
/// Generators such as hypothesis (schemathesis) build strings from such a
/// pattern directly; a lookahead they can only meet by drawing and
/// discarding, which took them minutes for a 1,024-character name. It also
/// cannot be fooled by a newline, which a lookahead's `.` does not cross.
pub const NAME_PATTERN: &str = concat!(
    "^(?:(?:",
    real_component!(r"[^/.\\\x00]"),
    r")|\.",
    later_component!(),
    "*/(?:",
    real_component!(),
    "))",
    later_component!(),
    "*$"
);

/// The rules of a path inside a session's working directory: like a name,
/// but a leading `/` is the working directory itself and an empty path or
/// `.` is allowed (the directory itself). Without lookarounds too: leading
/// slashes, then a first component that is not `..` and does not start
/// with `\`, then any components but `..`.
pub const PATH_PATTERN: &str =
    concat!(r"^/*(?:(?:\.|", real_component!(r"[^/.\\\x00]"), ")", later_component!(), "*)?$");

/// Base64 as clients produce it: standard alphabet, padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// One entry of `files` in an execute request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FileUpload {
    /// Path relative to the working directory.
    pub name: String,
    /// `string` (UTF-8 text) or `base64`; absent means `string`.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// The content in that encoding.
    pub content: String,
}

fn default_encoding() -> String {
    "string".to_string()
}

/// The encodings `encoding` accepts (the first two are documented; the
/// others are what clients send for text).
const TEXT_ENCODINGS: &[&str] = &["string", "utf-8", "utf8", "text"];

/// The white space a base64 content may contain anywhere (line breaks of
/// encoders that wrap, indentation): ASCII space, tab, line feed, carriage
/// return, vertical tab, form feed.
const BASE64_SPACE: &[char] = &[' ', '\t', '\n', '\r', '\x0b', '\x0c'];

/// A base64 text as [`decode_files`] decodes it: groups of four symbols,
/// a final group of two or three with optional padding, white space
/// ([`BASE64_SPACE`]) anywhere.
const BASE64_PATTERN: &str = concat!(
    r"^[ \t\n\r\x0b\x0c]*(?:(?:[A-Za-z0-9+/][ \t\n\r\x0b\x0c]*){4})*",
    r"(?:(?:[A-Za-z0-9+/][ \t\n\r\x0b\x0c]*){2}(?:=[ \t\n\r\x0b\x0c]*){0,2}",
    r"|(?:[A-Za-z0-9+/][ \t\n\r\x0b\x0c]*){3}(?:=[ \t\n\r\x0b\x0c]*)?)?$"
);

impl utoipa::PartialSchema for FileUpload {
    /// Exactly what [`decode_files`] accepts for one entry: either text
    /// (`encoding` absent or a text encoding) or base64 (then `content` must
    /// decode).
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let name = serde_json::json!({
            "type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": NAME_PATTERN,
            "description": "Path relative to the working directory, sub-folders allowed (\"data/raw.csv\"); \
                no `..`, not absolute, at most 255 bytes of UTF-8 per component",
        });
        let schema = serde_json::json!({
            "oneOf": [
                {
                    "type": "object", "title": "text file", "required": ["name", "content"],
                    "properties": {
                        "name": name,
                        "encoding": {"type": "string", "enum": TEXT_ENCODINGS, "default": "string"},
                        "content": {"type": "string", "description": "The file's text (written as UTF-8)"},
                    },
                },
                {
                    "type": "object", "title": "binary file", "required": ["name", "encoding", "content"],
                    "properties": {
                        "name": name,
                        "encoding": {"type": "string", "enum": ["base64"]},
                        "content": {"type": "string", "pattern": BASE64_PATTERN, "description": "The file's bytes, base64"},
                    },
                },
            ],
        });
        serde_json::from_value(schema).unwrap_or_else(|_| utoipa::openapi::RefOr::T(Default::default()))
    }
}

impl utoipa::ToSchema for FileUpload {}

/// A file that passed every check: its path split into safe components, and
/// its decoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidFile {
    /// Path components; none is empty, `.`, `..`, or contains `/` or NUL.
    pub components: Vec<String>,
    /// Decoded content.
    pub bytes: Vec<u8>,
}

impl ValidFile {
    /// The relative path, `/`-joined.
    pub fn display_name(&self) -> String {
        self.components.join("/")
    }
}

/// Why a `files` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The name is empty or names the working directory itself.
    #[error("files[{index}].name is empty: give a path relative to the working directory, e.g. \"data/input.csv\"")]
    EmptyName { index: usize },
    /// The name contains a NUL byte.
    #[error("files[{index}].name contains a NUL byte")]
    NulByte { index: usize },
    /// The name is absolute.
    #[error("files[{index}].name {name:?} is absolute: names are relative to the session's working directory")]
    Absolute { index: usize, name: String },
    /// The name contains a `..` component.
    #[error("files[{index}].name {name:?} contains \"..\": files must stay inside the working directory")]
    ParentDir { index: usize, name: String },
    /// The name or one of its components is too long.
    #[error(
        "files[{index}].name is too long (at most {MAX_NAME} characters, and {MAX_COMPONENT} bytes of UTF-8 per \
         component)"
    )]
    TooLong { index: usize },
    /// `encoding` is neither `string` nor `base64`.
    #[error("files[{index}].encoding {encoding:?} is not supported: use \"string\" or \"base64\"")]
    BadEncoding { index: usize, encoding: String },
    /// `content` is not valid base64.
    #[error("files[{index}].content is not valid base64 ({reason})")]
    BadBase64 { index: usize, reason: String },
    /// Two entries of the request would overwrite each other, or one would
    /// need to be both a file and a folder.
    #[error("files[{index}].name {name:?} conflicts with another file of the same request")]
    Conflict { index: usize, name: String },
}

impl FileError {
    /// The index of the offending entry in `files`.
    pub fn index(&self) -> usize {
        match self {
            FileError::EmptyName { index }
            | FileError::NulByte { index }
            | FileError::Absolute { index, .. }
            | FileError::ParentDir { index, .. }
            | FileError::TooLong { index }
            | FileError::BadEncoding { index, .. }
            | FileError::BadBase64 { index, .. }
            | FileError::Conflict { index, .. } => *index,
        }
    }
}

impl From<FileError> for crate::ApiError {
    /// A refused upload as the API reports it, naming the entry at fault.
    fn from(e: FileError) -> Self {
        let code = match e {
            FileError::Conflict { .. } => crate::ErrorCode::FileConflict,
            _ => crate::ErrorCode::InvalidFile,
        };
        crate::ApiError::new(code, format!("{e}; nothing was written")).with_param(format!("files[{}]", e.index()))
    }
}

/// Check every entry and decode its content; all or nothing.
pub fn decode_files(files: &[FileUpload]) -> Result<Vec<ValidFile>, FileError> {
    let mut out: Vec<ValidFile> = Vec::with_capacity(files.len());
    let mut files_seen = BTreeSet::new();
    let mut dirs_seen = BTreeSet::new();
    for (index, f) in files.iter().enumerate() {
        let components = split_name(index, &f.name)?;
        let bytes = match f.encoding.as_str() {
            e if TEXT_ENCODINGS.contains(&e) => f.content.as_bytes().to_vec(),
            "base64" => {
                let compact: String = f.content.chars().filter(|c| !BASE64_SPACE.contains(c)).collect();
                BASE64.decode(compact.as_bytes()).map_err(|e| FileError::BadBase64 { index, reason: e.to_string() })?
            }
            other => return Err(FileError::BadEncoding { index, encoding: other.to_string() }),
        };
        let joined = components.join("/");
        // A file may not also be a folder of another entry, nor be listed twice.
        let conflict = || FileError::Conflict { index, name: f.name.clone() };
        if files_seen.contains(&joined) || dirs_seen.contains(&joined) {
            return Err(conflict());
        }
        for end in 1..components.len() {
            let prefix = components[..end].join("/");
            if files_seen.contains(&prefix) {
                return Err(conflict());
            }
            dirs_seen.insert(prefix);
        }
        files_seen.insert(joined);
        out.push(ValidFile { components, bytes });
    }
    Ok(out)
}

/// A path inside a session's working directory, as the file endpoints take
/// it: split into safe components; empty (or `.`, `/`) means the directory
/// itself. The same rules as upload names, except that a leading `/` is
/// read as the working directory's root.
pub fn session_path(path: &str) -> Result<Vec<String>, crate::ApiError> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.split('/').all(|p| p.is_empty() || p == ".") && !trimmed.contains('\0') {
        return Ok(Vec::new());
    }
    split_name(0, trimmed).map_err(|e| {
        let why = e.to_string().replace("files[0].name", "path");
        crate::ApiError::new(crate::ErrorCode::InvalidFile, why).with_param("path")
    })
}

/// Split a name into components, refusing anything that could escape.
fn split_name(index: usize, name: &str) -> Result<Vec<String>, FileError> {
    if name.contains('\0') {
        return Err(FileError::NulByte { index });
    }
    if name.starts_with('/') || name.starts_with('\\') {
        return Err(FileError::Absolute { index, name: name.to_string() });
    }
    if name.chars().count() > MAX_NAME {
        return Err(FileError::TooLong { index });
    }
    let mut components = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(FileError::ParentDir { index, name: name.to_string() }),
            p if p.len() > MAX_COMPONENT => return Err(FileError::TooLong { index }),
            p => components.push(p.to_string()),
        }
    }
    if components.is_empty() {
        return Err(FileError::EmptyName { index });
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern in the OpenAPI document agrees with the code, case by case.
    #[test]
    fn the_documented_name_rules_are_the_enforced_ones() {
        let name_re = fancy_regex::Regex::new(NAME_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        let path_re = fancy_regex::Regex::new(PATH_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        let documented = |name: &str| {
            let by_pattern = name_re.is_match(name).unwrap_or(false);
            assert_eq!(by_pattern, split_name(0, name).is_ok(), "pattern and code disagree on {name:?}");
            assert_eq!(
                path_re.is_match(name).unwrap_or(false),
                session_path(name).is_ok(),
                "path pattern and code disagree on {name:?}"
            );
            by_pattern
        };
        for (name, ok) in [
            ("a", true),
            ("data/raw.csv", true),
            ("./a", true),
            ("a//b", true),
            ("...", true),
            ("..a", true),
            (".a", true),
            ("a/.", true),
            ("", false),
            (".", false),
            ("./", false),
            ("/a", false),
            ("\\a", false),
            ("..", false),
            ("a/../b", false),
            ("a/..", false),
            ("a\0b", false),
        ] {
            assert_eq!(documented(name), ok, "{name:?}");
        }
        // A component's length, at the bounds (ASCII: characters are bytes).
        let long = |n: usize| "a".repeat(n);
        for (name, ok) in [
            (long(255), true),
            (long(256), false),
            (format!("d/{}", long(255)), true),
            (format!("d/{}/e", long(256)), false),
            (format!(".{}", long(254)), true),
            (format!(".{}", long(255)), false),
            (format!("..{}", long(253)), true),
            (format!("..{}", long(254)), false),
            (format!("./{}", long(255)), true),
        ] {
            assert_eq!(documented(&name), ok, "{} characters", name.len());
        }
        // Every short name over a small alphabet, both ways.
        let alphabet = ['a', '.', '/', '\\', '\n'];
        let mut names = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> =
                names.iter().flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}"))).collect();
            names.extend(longer);
        }
        names.sort();
        names.dedup();
        for n in &names {
            documented(n);
        }
    }

    #[test]
    fn base64_with_or_without_padding_and_loose_trailing_bits_decodes_as_documented() {
        let pattern = fancy_regex::Regex::new(BASE64_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        for ok in ["", "QQ", "QQ=", "QQ==", "QUI", "QUI=", "QUJD", "QR", " QU JD\n", "Q\x0bQ\x0c=\t=", "QUJDQQ="] {
            assert!(decode_files(&[up("f", "base64", ok)]).is_ok(), "{ok:?}");
            assert!(pattern.is_match(ok).unwrap_or(false), "{ok:?}");
        }
        for bad in ["Q", "QUJDR", "Q===", "@@@@", "QQ\u{a0}", "QQ===", "QUJD=", "QUI==", "=", "Q=Q="] {
            assert!(decode_files(&[up("f", "base64", bad)]).is_err(), "{bad:?}");
            assert!(!pattern.is_match(bad).unwrap_or(true), "{bad:?}");
        }
    }

    fn up(name: &str, encoding: &str, content: &str) -> FileUpload {
        FileUpload { name: name.into(), encoding: encoding.into(), content: content.into() }
    }

    #[test]
    fn sub_folders_and_both_encodings_are_accepted() {
        let files = decode_files(&[
            up("myscript.py", "string", "print(1)"),
            up("data//./raw.csv", "base64", "YSxiCjEsMgo="),
            up("data/nopad.bin", "base64", "YQ"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(files[0].bytes, b"print(1)");
        assert_eq!(files[1].components, vec!["data", "raw.csv"]);
        assert_eq!(files[1].bytes, b"a,b\n1,2\n");
        assert_eq!(files[2].bytes, b"a");
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for (name, want) in [
            ("/etc/passwd", "absolute"),
            ("../x", "\"..\""),
            ("a/../../x", "\"..\""),
            ("a\0b", "NUL"),
            ("", "empty"),
            ("./", "empty"),
        ] {
            let err = decode_files(&[up(name, "string", "x")]).err();
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(want), "{name:?}: {msg}");
        }
        let long = "a".repeat(300);
        assert!(matches!(decode_files(&[up(&long, "string", "")]), Err(FileError::TooLong { .. })));
    }

    #[test]
    fn session_paths_are_relative_to_the_working_directory() {
        assert_eq!(session_path("").unwrap_or_default(), Vec::<String>::new());
        assert_eq!(session_path("/").unwrap_or_default(), Vec::<String>::new());
        assert_eq!(session_path("/data/x.csv").unwrap_or_default(), vec!["data", "x.csv"]);
        assert!(session_path("../etc").is_err());
        assert!(session_path("a/\0").is_err());
    }

    #[test]
    fn bad_base64_and_unknown_encodings_are_refused_with_their_index() {
        let err = decode_files(&[up("ok", "string", ""), up("b", "base64", "!!!")]).err();
        assert_eq!(err.as_ref().map(FileError::index), Some(1));
        let err = decode_files(&[up("c", "hex", "00")]).err();
        assert!(matches!(err, Some(FileError::BadEncoding { .. })));
    }

    #[test]
    fn entries_that_overwrite_each_other_conflict() {
        for pair in [["a", "a"], ["a", "a/b"], ["a/b", "a"]] {
            let err = decode_files(&[up(pair[0], "string", ""), up(pair[1], "string", "")]).err();
            assert!(matches!(err, Some(FileError::Conflict { index: 1, .. })), "{pair:?}");
        }
    }
}
