//! An error event reaches a Sentry-protocol receiver with the scope's tags and no secret. The
//! receiver is a plain HTTP listener on loopback that answers 200 to every request and keeps the
//! bodies (Sentry's envelope endpoint, `POST /api/<project>/envelope/`); the child process is
//! this test binary re-run with a role, so `logger::init` installs its global state there alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use logger::{LogConfig, LogFormat, Secret};

const CHILD: &str = "LOGGER_TEST_CHILD";
const DSN: &str = "LOGGER_TEST_DSN";
/// The password in the child's configuration, which must appear nowhere in what Sentry gets.
const SECRET_VALUE: &str = "hunter2-admin-secret";
/// How long the parent waits for the child's event; the child's guard flushes within Sentry's
/// default two-second shutdown timeout.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(30);

/// One request's path and body, read from one connection (`Content-Length` bodies only).
fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let path = request_line.split_whitespace().nth(1)?.to_owned();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            assert_ne!(
                name, "content-encoding",
                "the receiver reads plain bodies only: {line}"
            );
            if name == "content-length" {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let _ =
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
    Some((path, body))
}

/// Serves until the deadline, sending each request's path and body to the channel.
fn serve(listener: TcpListener, requests: mpsc::Sender<(String, Vec<u8>)>) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                if let Some(request) = read_request(&mut stream)
                    && requests.send(request).is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn error_event_carries_the_hosts_tags_and_no_secret() {
    if std::env::var(CHILD).as_deref() == Ok("sentry") {
        let dsn = std::env::var(DSN).unwrap();
        let config = LogConfig {
            format: LogFormat::Json,
            sentry_dsn: Some(Secret::new(dsn)),
            environment: "dev".into(),
            release: "0123abcd".into(),
            ..LogConfig::development("host-service")
        };
        let guard = logger::init(&config).unwrap();
        logger::tag_scope([
            ("instance.id", "i-0123456789abcdef0"),
            ("region", "us-east-1"),
            ("commit", "0123abcd"),
        ]);
        let admin_secret = Secret::new(SECRET_VALUE.to_owned());
        tracing::error!(%admin_secret, "the database refused the host");
        drop(guard);
        return;
    }

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, requests) = mpsc::channel();
    let server = std::thread::spawn(move || serve(listener, sender));

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "error_event_carries_the_hosts_tags_and_no_secret",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "sentry")
        .env(DSN, format!("http://publickey@127.0.0.1:{port}/42"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let event = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (path, body) = requests
            .recv_timeout(remaining)
            .expect("no event reached the receiver");
        assert_eq!(path, "/api/42/envelope/", "Sentry's envelope endpoint");
        let text = String::from_utf8(body).unwrap();
        assert!(
            !text.contains(SECRET_VALUE),
            "a secret reached Sentry: {text}"
        );
        // An envelope: a header line, then item header and payload lines; the event is the
        // payload after an item header of type "event" (Sentry omits `level` when it is error).
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        if let Some(event) = lines
            .windows(2)
            .find(|pair| pair[0]["type"] == "event")
            .map(|pair| pair[1].clone())
        {
            break event;
        }
    };
    assert_eq!(event["message"], "the database refused the host", "{event}");
    let tags = &event["tags"];
    assert_eq!(tags["service"], "host-service", "{event}");
    assert_eq!(tags["instance.id"], "i-0123456789abcdef0", "{event}");
    assert_eq!(tags["region"], "us-east-1", "{event}");
    assert_eq!(tags["commit"], "0123abcd", "{event}");
    assert_eq!(event["release"], "0123abcd", "{event}");
    assert_eq!(event["environment"], "dev", "{event}");
    // The receiver thread ends with the process (it stops by itself at its deadline).
    drop(server);
}
