//! `make bench`: users' profiles against moto's S3 — the time to load (list, download,
//! authenticate, decrypt, unpack) and to save (pack, encrypt, upload) a 10 MiB and a 100 MiB
//! profile, p50 and p99, and the process's peak memory while saving the larger one (goal:
//! bounded by a constant, not the profile's size). Profiles are 1 MiB files of random bytes
//! (incompressible: the archive is as large as the profile). moto runs in its own process, so
//! the memory figure is the host's side alone.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use dbclient::types::{MandelboxId, UserId};
use host_service::mappings::MandelboxDirs;
use host_service::profile::archive::Limits;
use host_service::profile::lifecycle::ProfileRequest;
use host_service::profile::store::{Store, StoreConfig};
use host_service::profile::{LoadOutcome, ProfileConfig, Profiles, SaveOutcome};
use logger::Secret;
use rand::RngCore as _;

const MIB: usize = 1024 * 1024;
/// (profile size in MiB, samples of each operation).
const CASES: [(usize, usize); 2] = [(10, 10), (100, 5)];
const TOKEN: &str = "bench-config-encryption-token";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    let moto = devstack::moto::Moto::start(&bin).await?;
    let bucket = "bench-profiles";
    devstack::moto::create_profile_bucket(&moto.endpoint(), bucket).await?;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
            .endpoint_url(moto.endpoint())
            .force_path_style(true)
            .build(),
    );
    let failures = prometheus::IntCounterVec::new(
        prometheus::Opts::new("profile_failures_total", "bench"),
        &["operation"],
    )?;
    let profiles = Profiles::new(
        Store::from_client(client, bucket),
        "localdevwithdb",
        ProfileConfig {
            store: StoreConfig {
                bucket: bucket.into(),
                region: "us-east-1".into(),
                endpoint: None,
            },
            limits: Limits::default(),
            max_archive_bytes: 1024 * MIB as u64,
            save_timeout: Duration::from_secs(25),
        },
        failures,
    );
    let root = tempfile::tempdir()?;
    let request = ProfileRequest {
        token: Some(Secret::new(TOKEN.to_owned())),
        ..ProfileRequest::default()
    };
    for (mib, samples) in CASES {
        let user = UserId::new(format!("bench-{mib}mib"))?;
        let (mut loads, mut saves) = (Vec::new(), Vec::new());
        let mut peak = None;
        for sample in 0..=samples {
            let dirs = MandelboxDirs::new(root.path(), MandelboxId::random());
            dirs.create("1").await?;
            let started = Instant::now();
            let pending = profiles.start_load(&dirs, Some(&user), "browsers/chrome");
            let outcome = profiles.finish_load(pending, &request).await;
            let load = started.elapsed();
            if sample == 0 {
                anyhow::ensure!(outcome == LoadOutcome::NoArchive, "{outcome:?}");
                write_profile(&dirs.user_configs(), mib)?;
            } else {
                anyhow::ensure!(
                    matches!(outcome, LoadOutcome::Loaded { bytes, .. } if bytes == (mib * MIB) as u64),
                    "{outcome:?}"
                );
                loads.push(load);
            }
            let last = sample == samples;
            if last {
                reset_peak_rss();
            }
            let rss_before = rss_kib("VmRSS");
            let started = Instant::now();
            let saved = profiles.save(&dirs).await;
            saves.push(started.elapsed());
            anyhow::ensure!(matches!(saved, SaveOutcome::Saved { .. }), "{saved:?}");
            if last {
                peak = Some((rss_before, rss_kib("VmHWM")));
            }
            dirs.remove().await?;
        }
        println!(
            "profile {mib} MiB: load p50 {} ms, p99 {} ms ({} samples); save p50 {} ms, p99 {} ms ({} samples)",
            percentile(&mut loads, 50),
            percentile(&mut loads, 99),
            loads.len(),
            percentile(&mut saves, 50),
            percentile(&mut saves, 99),
            saves.len(),
        );
        if let Some((Some(before), Some(high))) = peak {
            println!(
                "profile {mib} MiB: process RSS {} MiB before the last save, peak {} MiB during it (+{} MiB)",
                before / 1024,
                high / 1024,
                high.saturating_sub(before) / 1024
            );
        }
    }
    moto.stop().await;
    Ok(())
}

fn write_profile(dir: &Path, mib: usize) -> anyhow::Result<()> {
    let mut chunk = vec![0u8; MIB];
    for i in 0..mib {
        rand::rng().fill_bytes(&mut chunk);
        let sub = dir.join(format!("Default/dir{}", i % 8));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("file{i}")), &chunk)?;
    }
    Ok(())
}

fn percentile(samples: &mut [Duration], p: usize) -> u128 {
    samples.sort();
    let index = (samples.len() * p).div_ceil(100).saturating_sub(1);
    samples.get(index).map_or(0, Duration::as_millis)
}

/// Resets the kernel's high-water mark of this process's RSS (`VmHWM`) to the current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}
