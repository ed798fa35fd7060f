//! Behaviour of `logger::init` in a real process: the test re-runs its own binary as a child with
//! a role in `LOGGER_TEST_CHILD`, and checks what the child wrote to stderr.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use logger::{LogConfig, LogFormat, Secret};

const CHILD: &str = "LOGGER_TEST_CHILD";

fn child_stderr(role: &str, test_name: &str) -> (bool, String) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, role)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json_config() -> LogConfig {
    LogConfig {
        format: LogFormat::Json,
        ..LogConfig::development("logger-test")
    }
}

#[test]
fn panic_is_logged_as_a_json_error_event() {
    if std::env::var(CHILD).as_deref() == Ok("panic") {
        let _guard = logger::init(&json_config()).unwrap();
        panic!("boom from the child");
    }
    let (ok, stderr) = child_stderr("panic", "panic_is_logged_as_a_json_error_event");
    assert!(!ok, "the child must fail");
    let event = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "panic")
        .unwrap_or_else(|| panic!("no JSON panic event in: {stderr}"));
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["panic.message"], "boom from the child");
    assert!(
        event["panic.location"]
            .as_str()
            .unwrap()
            .contains("process.rs"),
        "{event}"
    );
}

#[test]
fn secrets_never_reach_the_log() {
    if std::env::var(CHILD).as_deref() == Ok("secret") {
        let _guard = logger::init(&json_config()).unwrap();
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Config {
            url: String,
            admin_secret: Secret<String>,
        }
        let config = Config {
            url: "http://127.0.0.1:8080/v1/graphql".into(),
            admin_secret: Secret::new("s3cr3t-value".into()),
        };
        let secret = config.admin_secret.clone();
        tracing::info!(?config, %secret, "configuration");
        return;
    }
    let (ok, stderr) = child_stderr("secret", "secrets_never_reach_the_log");
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("configuration"),
        "the event must be logged: {stderr}"
    );
    assert!(stderr.contains("127.0.0.1:8080"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-value"), "secret leaked: {stderr}");
}

#[test]
fn filter_drops_events_below_its_level() {
    if std::env::var(CHILD).as_deref() == Ok("filter") {
        let config = LogConfig {
            filter: "warn".into(),
            ..json_config()
        };
        let _guard = logger::init(&config).unwrap();
        tracing::info!("quiet-info-event");
        tracing::warn!("loud-warn-event");
        return;
    }
    let (ok, stderr) = child_stderr("filter", "filter_drops_events_below_its_level");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("loud-warn-event"), "{stderr}");
    assert!(!stderr.contains("quiet-info-event"), "{stderr}");
}
