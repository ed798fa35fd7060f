//! Live queries (contract §4.5): the whole result at once, then the whole result again each
//! time it changes. Hasura finds changes by polling every refetch interval; the stand-in polls
//! too, and also re-runs at once when a statement-level trigger (`devstack/sql/notify.sql`)
//! reports, through NOTIFY, that a table the query can read has committed a change. Results
//! are compared as complete response bodies, so a change to an unrelated row sends nothing.

use edge::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::Engine;
use super::exec::{self, Outcome, Prepared};
use super::permissions::SessionVariables;

/// The NOTIFY channel the triggers of `notify.sql` use.
pub(crate) const CHANNEL: &str = "devstack_table_changes";

/// Broadcast after the listener reconnects: notifications may have been missed, so every live
/// query re-runs.
pub(crate) const ANY_TABLE: &str = "*";

/// Notifications buffered per live query before it counts as lagged (and simply re-runs).
pub(crate) const CHANGES_CAPACITY: usize = 256;

/// Reconnecting the LISTEN connection after it drops (the database restarted): from 100 ms,
/// doubling to 5 s, forever — polling keeps live queries correct meanwhile, only slower.
const LISTEN_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Connects a dedicated session and LISTENs on [`CHANNEL`]; returns it ready to be driven.
pub(crate) async fn connect_listener(
    config: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    tokio_postgres::Error,
> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    // The LISTEN only completes while the connection is polled; notifications cannot arrive
    // before it has, so any message seen here is a notice and can be dropped.
    let statement = format!("LISTEN {CHANNEL}");
    {
        let listen = client.batch_execute(&statement);
        tokio::pin!(listen);
        let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
        loop {
            tokio::select! {
                result = &mut listen => {
                    result?;
                    break;
                }
                message = messages.next() => {
                    if let Some(Err(e)) = message {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok((client, connection))
}

/// Drives the LISTEN connection and broadcasts each changed table, reconnecting when the
/// connection is lost, until `stop` is cancelled.
pub(crate) async fn run_listener(
    config: tokio_postgres::Config,
    changes: broadcast::Sender<Arc<str>>,
    stop: CancellationToken,
    mut client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
) {
    loop {
        {
            let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = messages.next() => message,
                };
                match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // No receivers is normal (no live query running).
                        let _ = changes.send(Arc::from(n.payload()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::warn!(%error, "change listener lost its database connection");
                        break;
                    }
                    None => {
                        tracing::warn!("change listener's database connection closed");
                        break;
                    }
                }
            }
        }
        let mut retries = LISTEN_RETRY.start();
        loop {
            // LISTEN_RETRY has no deadline: a delay is always handed out.
            let delay = retries.next_delay().unwrap_or(LISTEN_RETRY.cap);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match connect_listener(&config).await {
                Ok((new_client, new_connection)) => {
                    // The old client belongs to the dead connection; the new one must live as
                    // long as its connection is driven.
                    drop(std::mem::replace(&mut client, new_client));
                    connection = new_connection;
                    let _ = changes.send(Arc::from(ANY_TABLE));
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, ?delay, "change listener could not reconnect");
                }
            }
        }
    }
}

/// One live query: yields the first result, then each result that differs from the last one
/// yielded.
pub(crate) struct LiveQuery {
    engine: Arc<Engine>,
    prepared: Prepared,
    /// The subscriber's role and session variables: each subscriber sees only its rows.
    vars: Arc<SessionVariables>,
    cancel: CancellationToken,
    changes: broadcast::Receiver<Arc<str>>,
    changes_closed: bool,
    /// Qualified names of the tables whose changes can alter the result.
    tables: Vec<String>,
    refetch: tokio::time::Interval,
    last_body: Option<String>,
    started: bool,
}

impl LiveQuery {
    pub fn new(
        engine: Arc<Engine>,
        prepared: Prepared,
        vars: Arc<SessionVariables>,
        cancel: CancellationToken,
    ) -> Self {
        // Subscribe before the first run: a change committed after its snapshot is then queued.
        let changes = engine.changes.subscribe();
        let tables = prepared
            .subscription_field
            .as_deref()
            .and_then(|field| {
                engine.model.table_by_gql_name(field).or_else(|| {
                    field
                        .strip_suffix("_by_pk")
                        .and_then(|t| engine.model.table_by_gql_name(t))
                })
            })
            .map(|table| {
                engine
                    .model
                    .reachable_tables(table)
                    .into_iter()
                    .map(|t| engine.model.table(t).qualified_name())
                    .collect()
            })
            .unwrap_or_default();
        let period = engine.options.refetch_interval.max(super::MIN_TIMER_PERIOD);
        let mut refetch = tokio::time::interval_at(Instant::now() + period, period);
        refetch.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            engine,
            prepared,
            vars,
            cancel,
            changes,
            changes_closed: false,
            tables,
            refetch,
            last_body: None,
            started: false,
        }
    }

    /// The next result to send, or `None` once cancelled.
    pub async fn next(&mut self) -> Option<Outcome> {
        loop {
            if self.started {
                if !self.wait_for_change().await {
                    return None;
                }
            } else {
                self.started = true;
            }
            let outcome = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                outcome = exec::execute(
                    self.engine.schema_for(&self.vars.role),
                    &self.engine.pool,
                    &self.prepared,
                    &self.vars,
                ) => outcome,
            };
            let body = live_body(&outcome);
            if self.last_body.as_ref() != Some(&body) {
                self.last_body = Some(body);
                return Some(outcome);
            }
        }
    }

    fn is_relevant(&self, table: &str) -> bool {
        table == ANY_TABLE || self.tables.iter().any(|t| t == table)
    }

    /// Waits for a relevant notification or the refetch tick; `false` when cancelled.
    async fn wait_for_change(&mut self) -> bool {
        loop {
            let changes_open = !self.changes_closed;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return false,
                change = self.changes.recv(), if changes_open => match change {
                    Ok(table) if self.is_relevant(&table) => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        self.changes_closed = true;
                        continue;
                    }
                },
                _ = self.refetch.tick() => break,
            }
        }
        // Coalesce a burst: everything already queued is covered by the run about to start.
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = self.changes.try_recv() {
        }
        // The run about to start is as fresh as a poll: restart the poll period from here.
        self.refetch.reset();
        true
    }
}

/// The body a live query sends: `{"data": ...}`, or `{"data":null,"errors":[...]}` when a
/// re-run fails.
pub(crate) fn live_body(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Data(body) => body.clone(),
        Outcome::Error(error) => format!(r#"{{"data":null,"errors":[{}]}}"#, error.to_json()),
    }
}
