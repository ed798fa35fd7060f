//! `whist-devstack`: the local whist stack in one command.
//!
//! `whist-devstack up` starts, on free loopback ports: a throwaway PostgreSQL cluster with the
//! migrations applied, the Hasura-compatible GraphQL endpoint, moto's server (EC2 and S3) and a
//! fake IMDSv2, then writes `.devstack/env` (sourceable: `DATABASE_URL`, `HASURA_GRAPHQL_URL`,
//! `HASURA_ADMIN_SECRET`, `AWS_ENDPOINT_URL`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`, ...) and runs
//! until Ctrl-C or SIGTERM, when it stops everything and removes its temporary state.
//!
//! `whist-devstack print-schema` prints the GraphQL schema the stand-in generates from the
//! migrations (what `schema.graphql` holds).
//!
//! Exit codes: 0 after a clean stop, 1 when something could not start or stop, 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use devstack::imds::Identity;
use devstack::stack::{Stack, StackOptions};

#[derive(Debug, Parser)]
#[command(name = "whist-devstack", version, about = "The local whist stack")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (EnvFilter syntax).
    #[arg(
        long,
        env = "WHIST_LOG",
        default_value = "info,tokio_postgres=warn",
        global = true
    )]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the stack and run until Ctrl-C.
    Up(UpArgs),
    /// Print the GraphQL schema generated from the migrations.
    PrintSchema,
    /// Write the chaos suite's figures (its JSON files) into a Markdown document, between the
    /// `<!-- chaos:begin -->` and `<!-- chaos:end -->` markers.
    ChaosReport {
        /// Directory of the scenarios' JSON files (`WHIST_CHAOS_REPORT_DIR` of the run).
        from: PathBuf,
        /// The document to update (docs/reliability.md).
        doc: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Directory for the env file and the PostgreSQL cluster.
    #[arg(long, env = "WHIST_DEVSTACK_DIR", default_value = ".devstack")]
    state_dir: PathBuf,
    /// moto_server executable (from the virtualenv `make setup` creates).
    #[arg(
        long,
        env = "WHIST_MOTO_SERVER",
        default_value = ".venv/bin/moto_server"
    )]
    moto_server: PathBuf,
    /// Run without moto (no EC2/S3 API).
    #[arg(long)]
    no_moto: bool,
    /// Requirements installed into the virtualenv beside moto_server when it is missing.
    #[arg(long, default_value = "devstack/python/requirements.txt")]
    python_requirements: PathBuf,
    /// GraphQL port (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    graphql_port: u16,
    /// Control API port (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    control_port: u16,
    /// Instance id of the default fake IMDS identity.
    #[arg(long, default_value = "i-0local000000000001")]
    instance_id: String,
    /// Region of the default fake IMDS identity.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Do not insert a PRE_CONNECTION row for the default identity (the scaling service
    /// inserts rows for the instances it launches).
    #[arg(long)]
    no_default_instance: bool,
    /// `client_sha` of the default instance's row: a prefix of the host service's commit
    /// (`dev` for builds without WHIST_COMMIT).
    #[arg(long, default_value = "dev")]
    client_sha: String,
    /// Run the whole system: also the scaling service (launching hosts into moto) and a host
    /// service for every instance it launches (the fleet emulator). What `make run` does.
    #[arg(long)]
    system: bool,
    /// With --system: regions the scaling service manages, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "us-east-1")]
    regions: Vec<String>,
    /// With --system: the scaling service's port.
    #[arg(long, default_value_t = 7730)]
    scaling_port: u16,
    /// With --system: free mandelboxes to keep ready per region.
    #[arg(long, default_value_t = 2)]
    desired_free_mandelboxes: u32,
    /// With --system: the most instances per region.
    #[arg(long, default_value_t = 4)]
    max_instances_per_region: u32,
    /// With --system: write the services' logs to their files only (.devstack/...).
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = logger::LogConfig {
        filter: cli.log.clone(),
        ..logger::LogConfig::development("devstack")
    };
    let _guard = match logger::init(&config) {
        Ok(g) => g,
        Err(error) => {
            eprintln!("whist-devstack: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(error) => {
            eprintln!("whist-devstack: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::PrintSchema => print_schema().await,
            Command::ChaosReport { from, doc } => devstack::chaos_report::write(&from, &doc),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("whist-devstack: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    if !args.no_moto && !args.moto_server.is_file() {
        create_virtualenv(&args.moto_server, &args.python_requirements).await?;
    }
    let options = StackOptions {
        state_dir: args.state_dir.clone(),
        moto_bin: (!args.no_moto).then_some(args.moto_server.clone()),
        graphql_port: args.graphql_port,
        control_port: args.control_port,
        admin_secret: None,
        default_identity: Identity::local(&args.instance_id, &args.region),
        default_instance_row: (!args.no_default_instance && !args.system)
            .then_some(args.client_sha.clone()),
    };
    if args.system {
        return up_system(args, options).await;
    }
    let stack = Stack::up(options).await?;
    println!("whist-devstack is up:");
    for (name, value) in stack.env() {
        if name.contains("SECRET") {
            println!("  {name:<34} (in the env file)");
        } else {
            println!("  {name:<34} {value}");
        }
    }
    println!("\nIn another shell: . {}", stack.env_file().display());
    println!("Ctrl-C stops the stack and removes its state.");
    wait_for_stop_signal().await;
    println!("\nstopping...");
    stack.down().await?;
    println!("stopped.");
    Ok(())
}

async fn up_system(args: UpArgs, stack: StackOptions) -> anyhow::Result<()> {
    use devstack::system::{System, SystemOptions};
    anyhow::ensure!(
        !args.no_moto,
        "--system needs moto: it is the scaling service's EC2"
    );
    let mut options = SystemOptions::new(stack);
    options.regions = args.regions.clone();
    options.scaling_port = args.scaling_port;
    options.desired_free_mandelboxes = args.desired_free_mandelboxes;
    options.max_instances_per_region = args.max_instances_per_region;
    options.echo_logs = !args.quiet;
    let system = System::up(options).await?;
    let env = system.stack().env();
    println!("\nwhist is up on this machine:");
    for (name, value) in &env {
        if name.contains("SECRET") {
            println!("  {name:<34} (in the env file)");
        } else {
            println!("  {name:<34} {value}");
        }
    }
    println!("  {:<34} {}", "scaling service", system.scaling_url());
    for region in system.regions() {
        println!("  {:<34} AMI {}", region.region, region.image_id);
    }
    println!(
        "\nThe scaling service is launching {} free mandelboxes' worth of hosts in {} (moto);",
        args.desired_free_mandelboxes,
        args.regions.join(", ")
    );
    println!("each instance boots a host service here, on its own 127.x.y.z address.");
    println!(
        "Logs: [scaling] and [i-...] lines below; files under {}.",
        args.state_dir.display()
    );
    println!("\nIn another shell:");
    println!("  . {}", system.stack().env_file().display());
    println!(
        "  {} --wait-for-capacity 120s   # one session, step by step",
        devstack::system::bin_dir().join("whist-client").display()
    );
    println!("Ctrl-C stops everything (hosts drain, then the stack goes).\n");
    wait_for_stop_signal().await;
    println!("\nstopping...");
    system.down().await?;
    println!("stopped.");
    Ok(())
}

/// Creates the virtualenv that holds `moto_server` (`<venv>/bin/moto_server`) and installs the
/// requirements into it.
async fn create_virtualenv(
    moto_server: &std::path::Path,
    requirements: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let venv = moto_server
        .parent()
        .and_then(std::path::Path::parent)
        .context("--moto-server must be <virtualenv>/bin/moto_server")?;
    println!(
        "creating the virtualenv {} with {} (once)...",
        venv.display(),
        requirements.display()
    );
    let run = |program: std::path::PathBuf, args: Vec<std::ffi::OsString>| async move {
        let status = tokio::process::Command::new(&program)
            .args(&args)
            .status()
            .await
            .with_context(|| format!("running {}", program.display()))?;
        anyhow::ensure!(status.success(), "{} failed: {status}", program.display());
        anyhow::Ok(())
    };
    run(
        "python3".into(),
        vec!["-m".into(), "venv".into(), venv.into()],
    )
    .await?;
    run(
        venv.join("bin/pip"),
        vec![
            "install".into(),
            "-q".into(),
            "-r".into(),
            requirements.into(),
        ],
    )
    .await?;
    anyhow::ensure!(
        moto_server.is_file(),
        "{} is still missing after the install",
        moto_server.display()
    );
    Ok(())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn print_schema() -> anyhow::Result<()> {
    let postgres = devstack::postgres::Postgres::start(None)?;
    let url = postgres.url("postgres");
    let mut client = devstack::postgres::connect(&url).await?;
    database::migrate(&mut client).await?;
    let hasura =
        devstack::hasura::Hasura::new(&url, devstack::hasura::HasuraOptions::default()).await?;
    print!("{}", hasura.sdl());
    Ok(())
}
