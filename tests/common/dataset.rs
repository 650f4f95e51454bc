//! A synthetic fleet written through the real store, for the benchmarks: `hosts` hosts with 50
//! pending updates each (every class, ages up to 120 days, a CVE on every tenth update), in
//! three environments.

use patch_agent_controller::store::{Location, SqlStore, Store};
use patch_agent_wire::proto::v1 as pb;
use std::time::{Duration, Instant};

/// Writes the fleet into `db`; how long it took.
pub fn fleet(db: &Location, hosts: usize) -> Duration {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let store = std::sync::Arc::new(SqlStore::open_writer(db).await.expect("store"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for h in 0..hosts {
            if set.len() >= 256 {
                set.join_next().await;
            }
            let store = store.clone();
            set.spawn(async move {
                let updates = (0..50)
                    .map(|u| pb::Update {
                        name: format!("pkg-{u}"),
                        architecture: "amd64".into(),
                        candidate_version: "2.0".into(),
                        sla_class: (u % 4 + 1) as i32,
                        severity: (u % 4 + 1) as i32,
                        cve_ids: if u % 10 == 0 {
                            vec![format!("CVE-2026-{:04}", 1000 + u)]
                        } else {
                            Vec::new()
                        },
                        first_seen: Some(prost_types::Timestamp {
                            seconds: now - ((h * 7 + u * 13) % 120) as i64 * 86_400,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })
                    .collect();
                let env = ["production", "staging", "development"][h % 3];
                store
                    .inventory(
                        pb::InventoryReport {
                            host_id: format!("host-{h:05}"),
                            labels: [("environment".to_string(), env.to_string())].into(),
                            checksum: format!("{h}"),
                            inventory: Some(pb::Inventory {
                                updates,
                                ..Default::default()
                            }),
                            scanned_at: Some(prost_types::Timestamp {
                                seconds: now - 600,
                                nanos: 0,
                            }),
                            ..Default::default()
                        },
                        now,
                    )
                    .await
                    .expect("write")
                    .expect("admitted");
            });
        }
        while set.join_next().await.is_some() {}
        started.elapsed()
    })
}
