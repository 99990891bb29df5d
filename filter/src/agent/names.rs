//! The agent's name-table sync: long-polls the table from the shim and publishes it to the
//! workers. The table is compiled here once, not on every worker.

use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use vmesh_api::paths::{content_type, query, shim};
use vmesh_core::names::NameIndex;
use vmesh_core::routes::RouteIndex;

use crate::callout;
use crate::config::Config;
use crate::metrics::{Counter, Metrics};
use crate::table;

const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct NamePoll {
    config: Config,
    metrics: Metrics,
    /// Version of the table last published (sent back so the source can long-poll).
    version: Option<String>,
    in_flight: Option<u32>,
    next_attempt: SystemTime,
    failures: u32,
}

impl NamePoll {
    pub fn new(config: Config, metrics: Metrics) -> Self {
        NamePoll {
            config,
            metrics,
            version: None,
            in_flight: None,
            next_attempt: SystemTime::UNIX_EPOCH,
            failures: 0,
        }
    }

    pub fn on_tick(&mut self, now: SystemTime) {
        if self.in_flight.is_none() && now >= self.next_attempt {
            self.poll();
        }
    }

    /// Whether a callout is this part's.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight == Some(token)
    }

    fn poll(&mut self) {
        let mut path = format!(
            "{}?{}={}",
            shim::NAME_TABLE,
            query::WAIT,
            self.config.table_wait_s
        );
        if let Some(v) = &self.version {
            path.push_str(&format!("&{}=", query::VERSION));
            path.push_str(&query::encode(v));
        }
        let headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", self.config.shim_authority.as_str()),
            ("accept", content_type::JSON),
        ];
        // The source answers 304 after `wait`; give it a margin before calling it dead.
        let timeout = Duration::from_secs(self.config.table_wait_s + 5);
        match hostcalls::dispatch_http_call(
            &self.config.shim_cluster,
            headers,
            None,
            vec![],
            timeout,
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(e) => {
                log::warn!(
                    "name table poll to cluster {} not sent: {e:?}",
                    self.config.shim_cluster
                );
                self.failed();
            }
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let reply = callout::response(headers, body_size);
        match reply.status {
            Some(200) => self.take_table(&reply.body),
            Some(304) => {
                self.failures = 0;
                self.poll();
            }
            Some(status) => {
                log::warn!("name table source answered {status}; serving the last table");
                self.failed();
            }
            None => {
                log::warn!("name table source unreachable; serving the last table");
                self.failed();
            }
        }
    }

    fn take_table(&mut self, json: &[u8]) {
        let index = match NameIndex::from_json(json) {
            Ok(index) => index,
            Err(e) => {
                self.metrics.add(Counter::TableRejected, 1);
                log::error!("name table refused, serving the last one: {e}");
                return self.failed();
            }
        };
        if let Err(e) = table::publish(&index) {
            log::error!("name table not published: {e}");
            return self.failed();
        }
        // Routing is compiled from the same document; a routing part this version cannot use
        // leaves the last good routes in place but does not hold the names back.
        match RouteIndex::from_json(json) {
            Ok(routes) => {
                if let Err(e) = crate::routes::publish(&routes) {
                    log::error!("routing table not published: {e}");
                }
            }
            Err(e) => {
                self.metrics.add(Counter::RoutesRejected, 1);
                log::error!("routing table refused, routing with the last one: {e}");
            }
        }
        self.metrics.add(Counter::TableUpdates, 1);
        self.metrics.set(Counter::TableNames, index.len() as u64);
        log::info!(
            "name table {} published ({} names)",
            index.version(),
            index.len()
        );
        self.version = Some(index.version().to_string());
        self.failures = 0;
        self.poll();
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << self.failures.min(8).saturating_sub(1);
        let delay = BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX);
        self.next_attempt = now() + delay;
    }
}

fn now() -> SystemTime {
    super::now()
}
