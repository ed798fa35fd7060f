//! What confines a mandelbox beyond its container spec (AppArmor, the engine's seccomp
//! profile), and the rule that outside local development a mandelbox never starts less confined
//! than `docs/host-service.md` says: a missing piece is an error, not a warning.
//!
//! Docker accepts `apparmor=NAME` for a profile that is not loaded, or on a kernel without
//! AppArmor, and silently runs the container unconfined; so the host reads the kernel's list of
//! loaded profiles before each spin-up and names the profile only when it is there. Outside
//! local development, a profile that is not loaded is loaded once at start (from
//! `/etc/apparmor.d/<profile>`, which `setup_host.sh` installs) and a spin-up without it fails.

use logger::AppEnv;

/// The kernel's list of loaded AppArmor profiles (absent without AppArmor).
pub const APPARMOR_PROFILES: &str = "/sys/kernel/security/apparmor/profiles";
/// Where `setup_host.sh` installs the mandelbox profile.
pub const APPARMOR_PROFILE_DIR: &str = "/etc/apparmor.d";

#[derive(Debug, thiserror::Error)]
pub enum ConfinementError {
    #[error(
        "the kernel has no AppArmor ({APPARMOR_PROFILES}: {reason}); outside local development a mandelbox runs only under the AppArmor profile {profile}"
    )]
    NoAppArmor { profile: String, reason: String },
    #[error(
        "the AppArmor profile {profile} is not loaded (setup_host.sh loads it: apparmor_parser -r -W {APPARMOR_PROFILE_DIR}/{profile})"
    )]
    ProfileNotLoaded { profile: String },
    #[error(
        "the Docker Engine does not confine containers with a seccomp profile (its security options: {options:?})"
    )]
    NoSeccomp { options: Vec<String> },
}

/// Whether `profile` is in the kernel's list (lines `NAME (MODE)`).
fn is_loaded(loaded: &str, profile: &str) -> bool {
    loaded
        .lines()
        .any(|l| l.split_whitespace().next() == Some(profile))
}

/// The AppArmor profile to name in a mandelbox's spec, from what the kernel says is loaded
/// (`loaded`: the contents of [`APPARMOR_PROFILES`], or why it cannot be read). In local
/// development a missing profile means none; elsewhere it is an error.
pub fn choose_apparmor(
    env: AppEnv,
    profile: &str,
    loaded: &std::io::Result<String>,
) -> Result<Option<String>, ConfinementError> {
    match loaded {
        Ok(list) if is_loaded(list, profile) => Ok(Some(profile.to_owned())),
        _ if env.is_local() => Ok(None),
        Ok(_) => Err(ConfinementError::ProfileNotLoaded {
            profile: profile.to_owned(),
        }),
        Err(e) => Err(ConfinementError::NoAppArmor {
            profile: profile.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// [`choose_apparmor`] with what the kernel says now.
pub fn apparmor_for_mandelbox(
    env: AppEnv,
    profile: &str,
) -> Result<Option<String>, ConfinementError> {
    choose_apparmor(env, profile, &std::fs::read_to_string(APPARMOR_PROFILES))
}

/// At start outside local development: loads the profile when the kernel has AppArmor and the
/// profile is installed but not loaded (after a reboot without the AppArmor service, say).
/// What it cannot do is logged; each spin-up then refuses to start without the profile.
pub async fn load_apparmor_profile(env: AppEnv, profile: &str) {
    let loaded = std::fs::read_to_string(APPARMOR_PROFILES);
    match &loaded {
        Ok(list) if is_loaded(list, profile) => {
            tracing::info!(profile, "AppArmor profile loaded");
            return;
        }
        Err(_) if env.is_local() => {
            tracing::info!("no AppArmor on this host: local mandelboxes run without it");
            return;
        }
        Err(error) => {
            tracing::error!(%error, profile, "no AppArmor on this host: mandelboxes will not start");
            return;
        }
        Ok(_) if env.is_local() => {
            tracing::info!(
                profile,
                "AppArmor profile not loaded: local mandelboxes run without it"
            );
            return;
        }
        Ok(_) => {}
    }
    let path = std::path::Path::new(APPARMOR_PROFILE_DIR).join(profile);
    match tokio::process::Command::new("apparmor_parser")
        .args(["-r", "-W"])
        .arg(&path)
        .status()
        .await
    {
        Ok(status) if status.success() => tracing::info!(profile, "AppArmor profile loaded"),
        Ok(status) => {
            tracing::error!(%status, path = %path.display(), "cannot load the AppArmor profile: mandelboxes will not start");
        }
        Err(error) => {
            tracing::error!(%error, "cannot run apparmor_parser: mandelboxes will not start");
        }
    }
}

/// The engine's security options (`docker info`: `name=seccomp,profile=...`) must include a
/// seccomp profile other than `unconfined`; in local development a missing one is logged only.
pub fn check_seccomp(env: AppEnv, options: &[String]) -> Result<(), ConfinementError> {
    let confined = options.iter().any(|o| {
        let fields: Vec<&str> = o.split(',').collect();
        fields.contains(&"name=seccomp") && !fields.contains(&"profile=unconfined")
    });
    if confined {
        Ok(())
    } else if env.is_local() {
        tracing::warn!(
            ?options,
            "the Docker Engine runs containers without seccomp: local mandelboxes are less confined"
        );
        Ok(())
    } else {
        Err(ConfinementError::NoSeccomp {
            options: options.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = "mandelbox-apparmor-profile";

    fn loaded(list: &str) -> std::io::Result<String> {
        Ok(list.to_owned())
    }

    fn absent() -> std::io::Result<String> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn outside_local_development_a_missing_apparmor_profile_refuses_the_mandelbox() {
        for env in [AppEnv::Dev, AppEnv::Staging, AppEnv::Prod] {
            assert!(matches!(
                choose_apparmor(env, PROFILE, &loaded("docker-default (enforce)\n")),
                Err(ConfinementError::ProfileNotLoaded { .. })
            ));
            assert!(matches!(
                choose_apparmor(env, PROFILE, &absent()),
                Err(ConfinementError::NoAppArmor { .. })
            ));
            // A profile whose name merely starts with ours is not ours.
            assert!(
                choose_apparmor(
                    env,
                    PROFILE,
                    &loaded("mandelbox-apparmor-profile2 (enforce)")
                )
                .is_err()
            );
            assert_eq!(
                choose_apparmor(
                    env,
                    PROFILE,
                    &loaded("docker-default (enforce)\nmandelbox-apparmor-profile (enforce)\n")
                )
                .unwrap()
                .as_deref(),
                Some(PROFILE)
            );
        }
    }

    #[test]
    fn local_development_runs_without_a_profile_it_does_not_have() {
        for env in [AppEnv::LocalDev, AppEnv::LocalDevWithDb] {
            assert_eq!(choose_apparmor(env, PROFILE, &absent()).unwrap(), None);
            assert_eq!(choose_apparmor(env, PROFILE, &loaded("")).unwrap(), None);
            assert_eq!(
                choose_apparmor(
                    env,
                    PROFILE,
                    &loaded("mandelbox-apparmor-profile (enforce)")
                )
                .unwrap()
                .as_deref(),
                Some(PROFILE)
            );
        }
    }

    #[test]
    fn an_engine_without_seccomp_is_refused_outside_local_development() {
        let with = vec![
            "name=seccomp,profile=default".to_owned(),
            "name=cgroupns".to_owned(),
        ];
        let unconfined = vec!["name=seccomp,profile=unconfined".to_owned()];
        let without = vec!["name=apparmor".to_owned()];
        assert!(check_seccomp(AppEnv::Prod, &with).is_ok());
        assert!(check_seccomp(AppEnv::Prod, &unconfined).is_err());
        assert!(check_seccomp(AppEnv::Staging, &without).is_err());
        assert!(check_seccomp(AppEnv::LocalDev, &without).is_ok());
    }
}
