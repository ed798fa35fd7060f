//! Containers' states and the engine's events about them, as the lifecycle sees them.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerStateStatusEnum, ContainerSummaryStateEnum, EventMessage};

use super::ContainerId;
use crate::ports::PortMap;

/// Where a container is in its life, as Docker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
    /// A state this code does not know (a newer engine).
    Unknown,
}

impl ContainerStatus {
    pub(super) fn from_inspect(status: Option<ContainerStateStatusEnum>) -> Self {
        match status {
            Some(ContainerStateStatusEnum::CREATED) => Self::Created,
            Some(ContainerStateStatusEnum::RUNNING) => Self::Running,
            Some(ContainerStateStatusEnum::PAUSED) => Self::Paused,
            Some(ContainerStateStatusEnum::RESTARTING) => Self::Restarting,
            Some(ContainerStateStatusEnum::REMOVING) => Self::Removing,
            Some(ContainerStateStatusEnum::EXITED) => Self::Exited,
            Some(ContainerStateStatusEnum::DEAD) => Self::Dead,
            _ => Self::Unknown,
        }
    }

    pub(super) fn from_summary(state: Option<ContainerSummaryStateEnum>) -> Self {
        match state {
            Some(ContainerSummaryStateEnum::CREATED) => Self::Created,
            Some(ContainerSummaryStateEnum::RUNNING) => Self::Running,
            Some(ContainerSummaryStateEnum::PAUSED) => Self::Paused,
            Some(ContainerSummaryStateEnum::RESTARTING) => Self::Restarting,
            Some(ContainerSummaryStateEnum::REMOVING) => Self::Removing,
            Some(ContainerSummaryStateEnum::EXITED) => Self::Exited,
            Some(ContainerSummaryStateEnum::DEAD) => Self::Dead,
            _ => Self::Unknown,
        }
    }

    /// Whether the container's process may be alive (running, paused or restarting).
    pub fn is_alive(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Restarting)
    }
}

/// What [`ContainerRuntime::inspect_state`] reports about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub status: ContainerStatus,
    pub running: bool,
    /// The exit code once the container has exited (or died); `None` before.
    pub exit_code: Option<i64>,
    /// Whether the kernel's OOM killer ended it (the exit code is then 137).
    pub oom_killed: bool,
}

/// A container of ours found by [`ContainerRuntime::list_mandelboxes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandelboxContainer {
    pub id: ContainerId,
    /// The name without Docker's leading `/`.
    pub name: String,
    pub status: ContainerStatus,
    pub labels: BTreeMap<String, String>,
    /// The host ports the engine publishes now. Docker reports them only while the container
    /// runs: empty for one that is created or exited.
    pub ports: PortMap,
}

/// What happened to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEventKind {
    Start,
    /// The process ended; `exit_code` is `None` only when the engine did not say.
    Die {
        exit_code: Option<i64>,
    },
    /// The kernel OOM killer hit the container (a `Die` with code 137 follows).
    Oom,
    /// The container was removed.
    Destroy,
}

/// One container event from [`ContainerRuntime::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub id: ContainerId,
    pub kind: ContainerEventKind,
    /// The container's name, when the engine sent it.
    pub name: Option<String>,
    /// The container's labels (ours included, e.g. [`LABEL_MANDELBOX_ID`]).
    pub labels: BTreeMap<String, String>,
}

/// Event attributes Docker adds beside the container's labels; not labels themselves.
const NON_LABEL_ATTRIBUTES: [&str; 4] = ["name", "image", "exitCode", "signal"];
/// The actions [`parse_event`] turns into events, also sent to the engine as a filter.
pub(super) const EVENT_ACTIONS: [&str; 4] = ["start", "die", "oom", "destroy"];

/// Turns one Docker event message into a container event; `None` for anything that is not a
/// container start, die, oom or destroy (health checks, exec, attach, ...), or that lacks an id.
pub fn parse_event(message: &EventMessage) -> Option<ContainerEvent> {
    use bollard::models::EventMessageTypeEnum;
    if let Some(typ) = message.typ
        && typ != EventMessageTypeEnum::CONTAINER
    {
        return None;
    }
    let actor = message.actor.as_ref()?;
    let id = ContainerId::new(actor.id.clone()?).ok()?;
    let empty = HashMap::new();
    let attributes = actor.attributes.as_ref().unwrap_or(&empty);
    let kind = match message.action.as_deref()? {
        "start" => ContainerEventKind::Start,
        "die" => ContainerEventKind::Die {
            exit_code: attributes
                .get("exitCode")
                .and_then(|code| code.trim().parse::<i64>().ok()),
        },
        "oom" => ContainerEventKind::Oom,
        "destroy" => ContainerEventKind::Destroy,
        _ => return None,
    };
    let labels = attributes
        .iter()
        .filter(|(k, _)| !NON_LABEL_ATTRIBUTES.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(ContainerEvent {
        id,
        kind,
        name: attributes.get("name").cloned(),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::{LABEL_MANAGED, LABEL_MANDELBOX_ID};
    use bollard::models::{EventActor, EventMessageTypeEnum};
    fn message(action: &str, attributes: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("abc123".to_owned()),
                attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
            }),
            ..EventMessage::default()
        }
    }

    #[test]
    fn die_exit_code_string_becomes_a_number_and_labels_are_separated() {
        let event = parse_event(&message(
            "die",
            &[
                ("exitCode", "3"),
                ("name", "mb-1"),
                ("image", "whist/mandelbox-stub:latest"),
                (LABEL_MANAGED, "true"),
                (LABEL_MANDELBOX_ID, "m-1"),
            ],
        ))
        .unwrap();
        assert_eq!(event.id.as_str(), "abc123");
        assert_eq!(event.kind, ContainerEventKind::Die { exit_code: Some(3) });
        assert_eq!(event.name.as_deref(), Some("mb-1"));
        assert_eq!(
            event.labels,
            BTreeMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_MANDELBOX_ID.to_owned(), "m-1".to_owned()),
            ])
        );
    }

    #[test]
    fn die_without_a_readable_exit_code_has_none() {
        for attributes in [&[][..], &[("exitCode", "x")][..], &[("exitCode", "")][..]] {
            let event = parse_event(&message("die", attributes)).unwrap();
            assert_eq!(event.kind, ContainerEventKind::Die { exit_code: None });
        }
        let event = parse_event(&message("die", &[("exitCode", "137")])).unwrap();
        assert_eq!(
            event.kind,
            ContainerEventKind::Die {
                exit_code: Some(137)
            }
        );
    }

    #[test]
    fn start_oom_destroy_are_parsed() {
        for (action, kind) in [
            ("start", ContainerEventKind::Start),
            ("oom", ContainerEventKind::Oom),
            ("destroy", ContainerEventKind::Destroy),
        ] {
            assert_eq!(parse_event(&message(action, &[])).unwrap().kind, kind);
        }
    }

    #[test]
    fn unknown_actions_and_other_types_are_ignored() {
        for action in [
            "create",
            "kill",
            "stop",
            "attach",
            "exec_start: sh",
            "health_status: healthy",
            "",
        ] {
            assert_eq!(parse_event(&message(action, &[])), None, "{action}");
        }
        let mut network = message("start", &[]);
        network.typ = Some(EventMessageTypeEnum::NETWORK);
        assert_eq!(parse_event(&network), None);
        let mut no_actor = message("start", &[]);
        no_actor.actor = None;
        assert_eq!(parse_event(&no_actor), None);
        let mut bad_id = message("start", &[]);
        if let Some(actor) = bad_id.actor.as_mut() {
            actor.id = Some("../images".to_owned());
        }
        assert_eq!(parse_event(&bad_id), None);
    }
}
