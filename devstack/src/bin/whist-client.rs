//! `whist-client`: plays Whist's client app against the local system (`make run`): gets a token
//! from devstack's fake Auth0, asks the scaling service for a mandelbox, hands it its settings
//! over the host's pinned json_transport, connects to the mandelbox, optionally stays, leaves.
//! Prints each step with its duration (or, with `--json`, one JSON object per session).
//!
//! Exit codes: 0 every session completed; 1 a session failed (the message names the step and
//! the server's error); 2 bad arguments. The access token is never printed.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use devstack::client::{
    AccessToken, Client, ClientOptions, DEFAULT_SCALING_URL, LOCAL_DEV_COMMIT, SessionOptions,
    default_json_data, parse_duration, random_user_id,
};

#[derive(Debug, Parser)]
#[command(
    name = "whist-client",
    version,
    about = "Simulates Whist's client app against the local system: token, assign, json_transport, connect"
)]
struct Args {
    /// The scaling service.
    #[arg(long, env = "WHIST_SCALING_SERVICE_URL", default_value = DEFAULT_SCALING_URL)]
    scaling_url: String,
    /// devstack's control API, which issues tokens (`.devstack/env` sets it).
    #[arg(long, env = "WHIST_DEVSTACK_CONTROL_URL")]
    control_url: Option<String>,
    /// The user (the token's `sub`); default a random `local-user-…`.
    #[arg(long)]
    user_id: Option<String>,
    /// `user_email` in the assign request (the scaling service only logs it).
    #[arg(long)]
    user_email: Option<String>,
    /// Regions, closest first (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_value = "us-east-1")]
    regions: Vec<String>,
    /// The client's commit hash; `local_dev` means "whatever the hosts run".
    #[arg(long, default_value = LOCAL_DEV_COMMIT)]
    commit: String,
    /// Sessions to run, one after the other.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    sessions: u32,
    /// Stay connected to the mandelbox this long before leaving (e.g. 30s, 2m).
    #[arg(long, value_parser = parse_duration)]
    hold: Option<Duration>,
    /// Retry NO_INSTANCE_AVAILABLE until this much time has passed (hosts may be booting).
    #[arg(long, value_parser = parse_duration)]
    wait_for_capacity: Option<Duration>,
    /// Use this access token instead of asking devstack for one (never printed).
    #[arg(long, env = "WHIST_CLIENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The settings sent as json_data (the text of a JSON object); default: the client app's keys.
    #[arg(long)]
    json_data: Option<String>,
    /// One JSON object per session on stdout instead of the human-readable report.
    #[arg(long)]
    json: bool,
    /// The user's profile token (`config_encryption_token`, at least 15 characters; never
    /// printed). Default: `local-config-token-<user id>`, so sessions of one `--user-id` share a
    /// profile, as the client app's saved token makes them.
    #[arg(long, env = "WHIST_CLIENT_CONFIG_TOKEN", hide_env_values = true)]
    config_token: Option<String>,
    /// Tell the host the profile token is new: the session starts from an empty profile.
    #[arg(long)]
    new_config_token: bool,
    /// Send no profile token at all.
    #[arg(long, conflicts_with_all = ["config_token", "new_config_token"])]
    no_config_token: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("whist-client: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let usage = |message: String| {
        eprintln!("whist-client: {message}");
        ExitCode::from(2)
    };
    let token = match args.token.map(AccessToken::new).transpose() {
        Ok(t) => t,
        Err(error) => return usage(format!("--token: {error}")),
    };
    let json_data = args.json_data.unwrap_or_else(default_json_data);
    match serde_json::from_str::<serde_json::Value>(&json_data) {
        Ok(v) if v.is_object() => {}
        _ => return usage("--json-data: the text of a JSON object expected".to_owned()),
    }
    let client = match Client::new(ClientOptions {
        scaling_url: args.scaling_url,
        control_url: args.control_url,
        regions: args.regions,
        commit: args.commit,
        ..ClientOptions::default()
    }) {
        Ok(c) => c,
        Err(error) => return usage(error.to_string()),
    };
    let user_id = args.user_id.unwrap_or_else(random_user_id);
    let config_token = (!args.no_config_token).then(|| {
        args.config_token
            .unwrap_or_else(|| format!("local-config-token-{user_id}"))
    });
    let session = SessionOptions {
        user_id: user_id.clone(),
        token,
        user_email: args.user_email,
        json_data,
        hold: args.hold,
        wait_for_capacity: args.wait_for_capacity,
        config_token,
        new_config_token: args.new_config_token,
    };
    let mut stdout = std::io::stdout().lock();
    for n in 1..=args.sessions {
        if !args.json {
            let _ = writeln!(
                stdout,
                "session {n}/{} as {user_id} → {}",
                args.sessions,
                client.options().scaling_url
            );
        }
        match client.run_session(&session).await {
            Ok(report) => {
                let _ = if args.json {
                    writeln!(stdout, "{}", report.to_json())
                } else {
                    write!(stdout, "{}", report.render())
                };
                let _ = stdout.flush();
            }
            Err(failure) => {
                if args.json {
                    let _ = writeln!(stdout, "{}", failure.to_json());
                    let _ = stdout.flush();
                }
                // Errors name their step, except those about the options.
                let at = match failure.error.step() {
                    Some(_) => String::new(),
                    None => format!(" at {}", failure.step),
                };
                eprintln!(
                    "whist-client: session {n}/{} failed{at}: {}",
                    args.sessions, failure.error
                );
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
