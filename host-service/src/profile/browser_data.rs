//! The client's initial browser data (reference §3.10, steps 17–18 of §3.2): the extensions the
//! user imported (`imported-extensions.json` in the profile, merged with the request's) and the
//! one-shot `user-initial-file` (cookies, bookmarks, extensions) that the mandelbox imports and
//! deletes. Both are written into the profile directory with the no-follow rules of
//! [`crate::mappings`]: the directory is the mandelbox's to plant links in.

use std::io::Read as _;
use std::path::Path;

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat};
use serde_json::{Map, Value, json};

use crate::mappings::{self, MandelboxDirs, MappingError};

/// `unpacked_configs/imported-extensions.json`: `{"extensions": [ids…]}`.
pub const IMPORTED_EXTENSIONS: &str = "imported-extensions.json";
/// `unpacked_configs/user-initial-file`, named by the container's `WHIST_INITIAL_USER_DATA_FILE`.
pub const USER_INITIAL_FILE: &str = "user-initial-file";
/// The largest `imported-extensions.json` read back (a list of 32-character ids).
const MAX_EXTENSIONS_FILE: u64 = 256 * 1024;

/// What the client sent for the browser.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BrowserData {
    /// Cookies, a JSON string the browser imports.
    pub cookies: Option<String>,
    /// Bookmarks, a JSON string.
    pub bookmarks: Option<String>,
    /// Extension ids, comma-separated.
    pub extensions: Option<String>,
}

impl std::fmt::Debug for BrowserData {
    /// Cookies are credentials: only their size is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrowserData")
            .field("cookies_bytes", &self.cookies.as_ref().map(String::len))
            .field("bookmarks_bytes", &self.bookmarks.as_ref().map(String::len))
            .field("extensions", &self.extensions)
            .finish()
    }
}

/// The saved extension ids followed by the requested ones not already there (split at commas,
/// not trimmed, empty parts dropped: the original's merge).
pub fn merge_extensions(mut saved: Vec<String>, requested: Option<&str>) -> Vec<String> {
    for id in requested.unwrap_or("").split(',') {
        if !id.is_empty() && !saved.iter().any(|s| s == id) {
            saved.push(id.to_owned());
        }
    }
    saved
}

/// The extension ids of an `imported-extensions.json`; empty when it is not the expected shape.
pub fn parse_extensions(text: &str) -> Vec<String> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v.get("extensions")?.as_array().map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// `user-initial-file`'s JSON: `cookiesJSON`, `bookmarksJSON`, `extensions` (comma-joined), each
/// left out when empty.
pub fn initial_file(data: &BrowserData, extensions: &[String]) -> String {
    let mut object = Map::new();
    if let Some(cookies) = data.cookies.as_deref().filter(|c| !c.is_empty()) {
        object.insert("cookiesJSON".into(), Value::String(cookies.to_owned()));
    }
    if let Some(bookmarks) = data.bookmarks.as_deref().filter(|b| !b.is_empty()) {
        object.insert("bookmarksJSON".into(), Value::String(bookmarks.to_owned()));
    }
    if !extensions.is_empty() {
        object.insert("extensions".into(), Value::String(extensions.join(",")));
    }
    Value::Object(object).to_string()
}

/// Merges the request's extensions into the profile's list (rewritten only when the request
/// named any) and writes `user-initial-file`. Called after the profile is in place and before
/// `.configReady`.
pub async fn write(dirs: &MandelboxDirs, data: &BrowserData) -> Result<(), MappingError> {
    let relative = dirs.user_configs_relative();
    let saved = read_extensions(dirs.root(), &relative).await;
    let requested = data.extensions.as_deref().filter(|e| !e.is_empty());
    let extensions = merge_extensions(saved, requested);
    if requested.is_some() {
        let file = json!({ "extensions": extensions }).to_string();
        mappings::write_atomic_as(
            dirs.root(),
            &relative,
            IMPORTED_EXTENSIONS,
            file.as_bytes(),
            dirs.owner(),
        )
        .await?;
    }
    let initial = initial_file(data, &extensions);
    // The mandelbox's import script deletes it once read (§3.10): its user owns it.
    mappings::write_atomic_as(
        dirs.root(),
        &relative,
        USER_INITIAL_FILE,
        initial.as_bytes(),
        dirs.owner(),
    )
    .await
}

/// The profile's imported extensions, read without following a link; empty when missing or
/// unreadable.
async fn read_extensions(root: &Path, relative: &Path) -> Vec<String> {
    let (root, relative) = (root.to_owned(), relative.to_owned());
    let text = tokio::task::spawn_blocking(move || -> Option<String> {
        let dir = mappings::open_dir_beneath(&root, &relative).ok()?;
        let fd = openat(
            &dir,
            IMPORTED_EXTENSIONS,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let stat = fstat(&fd).ok()?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return None;
        }
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(MAX_EXTENSIONS_FILE)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    })
    .await
    .ok()
    .flatten();
    text.as_deref().map(parse_extensions).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use dbclient::types::MandelboxId;

    use super::*;

    #[test]
    fn extensions_merge_like_the_original() {
        let saved = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(merge_extensions(saved.clone(), None), ["a", "b"]);
        assert_eq!(
            merge_extensions(saved.clone(), Some("b,c,,a, d")),
            ["a", "b", "c", " d"]
        );
        assert_eq!(merge_extensions(Vec::new(), Some("x")), ["x"]);
        assert_eq!(parse_extensions(r#"{"extensions":["a","b"]}"#), ["a", "b"]);
        assert!(parse_extensions("not json").is_empty());
        assert!(parse_extensions(r#"{"extensions":"a"}"#).is_empty());
    }

    #[test]
    fn the_initial_file_leaves_out_what_is_empty() {
        assert_eq!(initial_file(&BrowserData::default(), &[]), "{}");
        let data = BrowserData {
            cookies: Some("[{\"name\":\"sid\"}]".into()),
            bookmarks: Some(String::new()),
            extensions: None,
        };
        let text = initial_file(&data, &["e1".into(), "e2".into()]);
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"cookiesJSON": "[{\"name\":\"sid\"}]", "extensions": "e1,e2"})
        );
    }

    #[tokio::test]
    async fn files_are_written_into_the_profile_and_a_planted_link_is_replaced() {
        let root = tempfile::tempdir().unwrap();
        let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
        dirs.create("1").await.unwrap();
        let profile = dirs.user_configs();
        std::fs::write(
            profile.join(IMPORTED_EXTENSIONS),
            r#"{"extensions":["saved"]}"#,
        )
        .unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, profile.join(USER_INITIAL_FILE)).unwrap();
        let data = BrowserData {
            cookies: Some("c".into()),
            bookmarks: Some("b".into()),
            extensions: Some("new,saved".into()),
        };
        write(&dirs, &data).await.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let initial: Value = serde_json::from_str(
            &std::fs::read_to_string(profile.join(USER_INITIAL_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            initial,
            json!({"cookiesJSON": "c", "bookmarksJSON": "b", "extensions": "saved,new"})
        );
        let imported = std::fs::read_to_string(profile.join(IMPORTED_EXTENSIONS)).unwrap();
        assert_eq!(parse_extensions(&imported), ["saved", "new"]);
    }
}
