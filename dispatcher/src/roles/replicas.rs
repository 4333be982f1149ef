//! Replicas that could not verify each other's tokens (issue 30): each
//! API replica registers its signing key and the keys it verifies
//! (`store::replicas`), refuses to start beside a live replica it is not
//! compatible with, and logs an error whenever such a peer appears later
//! (two replicas that started at the very same moment, or a peer that
//! skipped the check).
//!
//! Compatible means each verifies the other's signing key, which is what
//! the rotation in docs/standards/operations.md keeps true at every step.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::replicas::Replica;
use crate::store::Store;
use crate::tokens::Keyring;

/// How often a replica says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica not seen for this long is gone (killed without a clean stop).
pub const STALE: Duration = Duration::from_secs(15);

/// Why `me` and `peer` would refuse each other's tokens, if they would.
pub fn mismatch(me: &Replica, peer: &Replica) -> Option<String> {
    if !me.verify_kids.contains(&peer.signing_kid) {
        return Some(format!(
            "replica {} signs with key {}, which this replica does not verify",
            peer.name, peer.signing_kid
        ));
    }
    if !peer.verify_kids.contains(&me.signing_kid) {
        return Some(format!(
            "replica {} does not verify this replica's signing key {}",
            peer.name, me.signing_kid
        ));
    }
    None
}

/// This process's name among the replicas: host, pid and address.
pub fn replica_name(addr: Option<std::net::SocketAddr>) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    match addr {
        Some(a) => format!("{host}:{} ({a})", std::process::id()),
        None => format!("{host}:{}", std::process::id()),
    }
}

/// A registered replica, heartbeating until shutdown.
pub struct Membership {
    store: Store,
    me: Replica,
}

/// Registers this replica, or refuses with one line naming the peer and
/// what to do.
pub async fn join(store: &Store, keys: &Arc<Keyring>, name: String) -> std::io::Result<Membership> {
    let me = Replica {
        id: Uuid::new_v4(),
        name,
        signing_kid: keys.signing_kid().to_owned(),
        verify_kids: keys.verifying_kids(),
        seen_at: chrono::Utc::now(),
    };
    let bad = store
        .join_replicas(&me, STALE, |peer| mismatch(&me, peer).is_some())
        .await
        .map_err(|e| std::io::Error::other(format!("registering this replica: {e}")))?;
    if let Some(peer) = bad.first() {
        let why = mismatch(&me, peer).unwrap_or_default();
        let age = (chrono::Utc::now() - peer.seen_at).num_seconds().max(0);
        return Err(std::io::Error::other(format!(
            "signing-key mismatch: {why} (seen {age} s ago), so each would refuse the other's \
             tokens; give every replica the same --signing-key, or rotate as \
             docs/standards/operations.md says (--verify-key first); a replica that is gone is \
             forgotten {} s after its last heartbeat",
            STALE.as_secs()
        )));
    }
    tracing::info!(
        replica = me.name,
        kid = me.signing_kid,
        "registered among the API replicas"
    );
    Ok(Membership {
        store: store.clone(),
        me,
    })
}

impl Membership {
    /// Heartbeats until `shutdown`, logging an error once per incompatible
    /// peer seen, then deregisters.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut warned: HashSet<Uuid> = HashSet::new();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let beat = self.store.replica_heartbeat(&self.me, STALE).await;
            crate::metrics::role_pass("replicas", &beat);
            match beat {
                Ok(peers) => {
                    for peer in peers {
                        if let Some(why) = mismatch(&self.me, &peer) {
                            if warned.insert(peer.id) {
                                tracing::error!(
                                    peer = peer.name,
                                    "signing-key mismatch: {why}; tokens signed by one are \
                                     refused by the other (docs/standards/operations.md, key \
                                     rotation)"
                                );
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
            }
        }
        if let Err(e) = self.store.leave_replicas(self.me.id).await {
            tracing::warn!(error = %e, "could not deregister this replica");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, signing: &str, verify: &[&str]) -> Replica {
        Replica {
            id: Uuid::new_v4(),
            name: name.into(),
            signing_kid: signing.into(),
            verify_kids: verify.iter().map(|k| k.to_string()).collect(),
            seen_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn every_step_of_the_documented_rotation_is_compatible_and_leaving_one_out_is_not() {
        let old = replica("old", "A", &["A"]);
        let step2 = replica("step2", "A", &["A", "B"]);
        let step3 = replica("step3", "B", &["A", "B"]);
        let step4 = replica("step4", "B", &["B"]);
        for (a, b) in [(&old, &step2), (&step2, &step3), (&step3, &step4)] {
            assert_eq!(mismatch(a, b), None, "{} beside {}", a.name, b.name);
            assert_eq!(mismatch(b, a), None, "{} beside {}", b.name, a.name);
        }
        // Step 2 left out: the new signer beside an old replica.
        assert!(mismatch(&step3, &old)
            .unwrap()
            .contains("does not verify this replica"));
        assert!(mismatch(&old, &step3).unwrap().contains("signs with key B"));
        // Different keys outright.
        let other = replica("other", "C", &["C"]);
        assert!(mismatch(&old, &other).is_some());
    }
}
