//! Envoy stats the filter keeps (shown by the admin endpoint as `wasmcustom.vmesh_*`).
//! Stats are process-wide, so every worker VM defining the same name adds to one number, and
//! the agent, defining the same names on the main thread, reads those sums for its reports
//! ([`report_counters`]).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use vmesh_api::agent::{counter, Counters};
use vmesh_core::tunnel::Counts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Answered,
    NoData,
    Truncated,
    Forwarded,
    ForwardFailed,
    NotReady,
    FormErr,
    NotImp,
    Refused,
    BadVers,
    Dropped,
    DohRejected,
    TableUpdates,
    TableRejected,
    /// A gauge: names in the published table.
    TableNames,
    /// Outbound connections (`vmesh_outbound` root), all destinations.
    OutboundCx,
    /// Outbound connections that never reached an upstream.
    OutboundFailed,
    OutboundBytesSent,
    OutboundBytesReceived,
    /// Routing tables the agent refused (the names may still have been taken).
    RoutesRejected,
}

const ALL: [(Counter, &str, MetricType); 20] = [
    (Counter::Answered, "vmesh_dns_answered", MetricType::Counter),
    (Counter::NoData, "vmesh_dns_nodata", MetricType::Counter),
    (
        Counter::Truncated,
        "vmesh_dns_truncated",
        MetricType::Counter,
    ),
    (
        Counter::Forwarded,
        "vmesh_dns_forwarded",
        MetricType::Counter,
    ),
    (
        Counter::ForwardFailed,
        "vmesh_dns_forward_failed",
        MetricType::Counter,
    ),
    (
        Counter::NotReady,
        "vmesh_dns_not_ready",
        MetricType::Counter,
    ),
    (Counter::FormErr, "vmesh_dns_formerr", MetricType::Counter),
    (Counter::NotImp, "vmesh_dns_notimp", MetricType::Counter),
    (Counter::Refused, "vmesh_dns_refused", MetricType::Counter),
    (Counter::BadVers, "vmesh_dns_badvers", MetricType::Counter),
    (Counter::Dropped, "vmesh_dns_dropped", MetricType::Counter),
    (
        Counter::DohRejected,
        "vmesh_doh_rejected",
        MetricType::Counter,
    ),
    (
        Counter::TableUpdates,
        "vmesh_table_updates",
        MetricType::Counter,
    ),
    (
        Counter::TableRejected,
        "vmesh_table_rejected",
        MetricType::Counter,
    ),
    (Counter::TableNames, "vmesh_table_names", MetricType::Gauge),
    (
        Counter::OutboundCx,
        "vmesh_outbound_cx_total",
        MetricType::Counter,
    ),
    (
        Counter::OutboundFailed,
        "vmesh_outbound_cx_failed",
        MetricType::Counter,
    ),
    (
        Counter::OutboundBytesSent,
        "vmesh_outbound_bytes_sent",
        MetricType::Counter,
    ),
    (
        Counter::OutboundBytesReceived,
        "vmesh_outbound_bytes_received",
        MetricType::Counter,
    ),
    (
        Counter::RoutesRejected,
        "vmesh_routes_rejected",
        MetricType::Counter,
    ),
];

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    ids: [Option<u32>; ALL.len()],
}

impl Metrics {
    /// Defines every metric; one that the host refuses is logged and then skipped.
    pub fn define() -> Self {
        let mut ids = [None; ALL.len()];
        for (slot, (_, name, kind)) in ids.iter_mut().zip(ALL.iter()) {
            match hostcalls::define_metric(*kind, name) {
                Ok(id) => *slot = Some(id),
                Err(e) => log::warn!("metric {name} not defined: {e:?}"),
            }
        }
        Metrics { ids }
    }

    fn id(&self, counter: Counter) -> Option<u32> {
        // `ALL` lists the counters in declaration order (checked by a test), so the
        // discriminant is the index: no search per query.
        self.ids.get(counter as usize).copied().flatten()
    }

    pub fn add(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(id) = self.id(counter) {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The stat's current value (the sum over every VM that adds to it); 0 when the host has
    /// no such metric.
    pub fn get(&self, counter: Counter) -> u64 {
        self.id(counter)
            .and_then(|id| hostcalls::get_metric(id).ok())
            .unwrap_or(0)
    }

    pub fn set(&self, counter: Counter, value: u64) {
        if let Some(id) = self.id(counter) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn add_counts(&self, c: &Counts) {
        for (counter, n) in [
            (Counter::Answered, c.answered),
            (Counter::NoData, c.nodata),
            (Counter::Truncated, c.truncated),
            (Counter::Forwarded, c.forwarded),
            (Counter::ForwardFailed, c.forward_failed),
            (Counter::NotReady, c.not_ready),
            (Counter::FormErr, c.formerr),
            (Counter::NotImp, c.notimp),
            (Counter::Refused, c.refused),
            (Counter::BadVers, c.badvers),
            (Counter::Dropped, c.dropped),
        ] {
            self.add(counter, n);
        }
    }
}

/// The DNS counters of an agent report ([`counter`]), from the filter's stats:
/// - queries: every DNS message received, malformed ones included: each gets exactly one of
///   answered, NODATA, forwarded, not-ready SERVFAIL, FORMERR, NOTIMP, REFUSED, BADVERS,
///   dropped, or (DoH) a refused request;
/// - answered: answered from the table (addresses or NODATA);
/// - forwarded: sent to the shim's forwarder (failed forwards included);
/// - errors: what the filter answered with an error code or did not answer: FORMERR, NOTIMP,
///   REFUSED, BADVERS, SERVFAIL for a failed forward or before the first table, dropped
///   messages and refused DoH requests.
pub fn report_counters(get: impl Fn(Counter) -> u64) -> Counters {
    let sum = |counters: &[Counter]| {
        counters
            .iter()
            .fold(0u64, |total, c| total.saturating_add(get(*c)))
    };
    use Counter::*;
    let answered = sum(&[Answered, NoData]);
    let rejected = sum(&[
        NotReady,
        FormErr,
        NotImp,
        Refused,
        BadVers,
        Dropped,
        DohRejected,
    ]);
    let forwarded = get(Forwarded);
    let mut counters = Counters::new();
    for (name, value) in [
        (
            counter::DNS_QUERIES,
            forwarded.saturating_add(answered).saturating_add(rejected),
        ),
        (counter::DNS_ANSWERED, answered),
        (counter::DNS_FORWARDED, forwarded),
        (
            counter::DNS_ERRORS,
            rejected.saturating_add(get(ForwardFailed)),
        ),
        (counter::OUTBOUND_CONNECTIONS, get(OutboundCx)),
        (counter::OUTBOUND_FAILURES, get(OutboundFailed)),
    ] {
        counters.set(name, value);
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counters_sum_the_dns_stats() {
        // A distinct power of two per stat shows which ones each sum took.
        let get = |c: Counter| 1u64 << (c as u32);
        let r = report_counters(get);
        assert_eq!(r.len(), 6);
        let bits = |cs: &[Counter]| cs.iter().map(|c| get(*c)).sum::<u64>();
        use Counter::*;
        let answered = bits(&[Answered, NoData]);
        let other = bits(&[
            NotReady,
            FormErr,
            NotImp,
            Refused,
            BadVers,
            Dropped,
            DohRejected,
        ]);
        let r = |name| r.get(name).unwrap();
        assert_eq!(r(counter::DNS_ANSWERED), answered);
        assert_eq!(r(counter::DNS_FORWARDED), get(Forwarded));
        assert_eq!(r(counter::DNS_QUERIES), answered + get(Forwarded) + other);
        assert_eq!(r(counter::DNS_ERRORS), other + get(ForwardFailed));
        // Truncation and table stats are no queries of their own.
        assert_eq!(r(counter::OUTBOUND_CONNECTIONS), get(OutboundCx));
        assert_eq!(r(counter::OUTBOUND_FAILURES), get(OutboundFailed));
        for c in [
            Truncated,
            TableUpdates,
            TableRejected,
            TableNames,
            OutboundCx,
        ] {
            assert_eq!(r(counter::DNS_QUERIES) & get(c), 0, "{c:?}");
        }
    }

    #[test]
    fn metric_table_is_in_counter_order() {
        for (i, (counter, _, _)) in ALL.iter().enumerate() {
            assert_eq!(*counter as usize, i, "{counter:?}");
        }
    }
}
