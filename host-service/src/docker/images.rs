//! Which local image runs an app.

use super::{MAX_NAME_LEN, Op, RuntimeError};

/// The tag [`ContainerRuntime::find_image`] looks for.
pub const CURRENT_BUILD_TAG: &str = "current-build";

/// Checks an app name for [`ContainerRuntime::find_image`]: lower-case path segments of
/// `[a-z0-9._-]`, separated by single `/`, e.g. `browsers/chrome`.
pub fn validate_app_pattern(app: &str) -> Result<(), RuntimeError> {
    let invalid = |reason: &str| RuntimeError::Invalid {
        op: Op::FindImage,
        target: app.chars().take(MAX_NAME_LEN).collect(),
        reason: reason.to_owned(),
    };
    if app.is_empty() || app.len() > MAX_NAME_LEN {
        return Err(invalid("the app name must have 1 to 128 characters"));
    }
    for segment in app.split('/') {
        if segment.is_empty() {
            return Err(invalid("empty path segment"));
        }
        if !segment.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(invalid(
                "only lower-case ASCII letters, digits, '.', '_', '-' and '/' are allowed",
            ));
        }
    }
    Ok(())
}

/// Whether the image reference `tag` is `<app>:current-build`, possibly under a registry or
/// namespace prefix that ends at a `/`: `browsers/chrome` matches
/// `whist/browsers/chrome:current-build` but not `x/browsers/chromey:current-build` or
/// `x/mybrowsers/chrome:current-build`. A plain string comparison: no regex to panic on.
pub fn image_matches_app(app: &str, tag: &str) -> bool {
    let Some(repository) = tag
        .strip_suffix(CURRENT_BUILD_TAG)
        .and_then(|t| t.strip_suffix(':'))
    else {
        return false;
    };
    match repository.strip_suffix(app) {
        Some("") => true,
        Some(prefix) => prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_matching_is_anchored_at_a_path_segment() {
        let app = "browsers/chrome";
        assert!(image_matches_app(
            app,
            "whist/browsers/chrome:current-build"
        ));
        assert!(image_matches_app(app, "browsers/chrome:current-build"));
        assert!(image_matches_app(
            app,
            "localhost:5000/whist/browsers/chrome:current-build"
        ));
        assert!(!image_matches_app(app, "x/browsers/chromey:current-build"));
        assert!(!image_matches_app(app, "x/mybrowsers/chrome:current-build"));
        assert!(!image_matches_app(app, "whist/browsers/chrome:latest"));
        assert!(!image_matches_app(
            app,
            "whist/browsers/chrome:current-build-2"
        ));
        assert!(!image_matches_app(app, "whist/browsers/chrome"));
        assert!(!image_matches_app(app, "<none>:<none>"));
    }

    #[test]
    fn app_patterns_that_were_regexes_are_refused_not_a_panic() {
        for bad in [
            "",
            "browsers/(chrome",
            "a//b",
            "/chrome",
            "chrome/",
            "Chrome",
            "c:1",
            "*",
        ] {
            assert!(validate_app_pattern(bad).is_err(), "{bad:?}");
        }
        for good in ["chrome", "browsers/chrome", "a.b_c-d/e"] {
            assert!(validate_app_pattern(good).is_ok(), "{good:?}");
        }
    }
}
