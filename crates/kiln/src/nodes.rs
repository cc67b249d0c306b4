//! `kiln nodes`: the nodes of a cluster as the shared store knows them,
//! for an operator (`kubectl exec kiln-0 -- kiln nodes` in a pod, which
//! has `KILN_DATABASE_URL`). Each node's row is what it last published: its
//! lease, its address, and the capacity placement decides on (ready kernels
//! and live sessions within half a second of a change, free memory at each
//! lease renewal). `--json` prints what `GET /v1/admin/nodes` answers.

use crate::admin::DataDir;
use crate::table::print_table;
use chrono::{DateTime, Utc};

/// Seconds from `now` to `at`, said the way a person reads it.
fn lease_text(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (at - now).num_milliseconds() as f64 / 1000.0;
    if secs >= 0.0 {
        format!("{secs:.1} s left")
    } else {
        format!("ended {:.0} s ago", -secs)
    }
}

pub async fn nodes(json: bool, data: DataDir) -> anyhow::Result<()> {
    let now = Utc::now();
    let nodes = kiln_store::node_infos(&data.store().await?.nodes().await?, now);
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    if nodes.is_empty() {
        eprintln!(
            "no nodes: no kiln serve has registered in this database (nodes register when they share one: \
             kiln serve --database postgres://... --advertise URL)"
        );
        return Ok(());
    }
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.state.as_str().to_string(),
                n.advertise.clone().unwrap_or_else(|| "-".into()),
                n.ready_kernels.to_string(),
                format!("{} of {}", n.live_sessions, n.max_sessions),
                format!("{} MiB", n.memory_available_bytes >> 20),
                lease_text(n.lease_expires_at, now),
                n.incarnation.clone(),
            ]
        })
        .collect();
    print_table(&["NODE", "STATE", "ADVERTISE", "READY", "SESSIONS", "MEMORY FREE", "LEASE", "INCARNATION"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_reads_as_time_left_or_time_since_it_ended() {
        let now = Utc::now();
        assert_eq!(lease_text(now + chrono::Duration::milliseconds(4_340), now), "4.3 s left");
        assert_eq!(lease_text(now - chrono::Duration::seconds(12), now), "ended 12 s ago");
    }
}
