//! The contract every [`Store`] implementation must meet, as one async test function: the
//! embedded store runs it in `tests/store.rs`, and an etcd adapter must pass it unchanged.

use std::time::Duration;

use super::{Event, Precondition, Store, StoreError, Txn};

/// Runs the contract against an empty store `s`; `advance` moves the clock its leases expire by
/// (a manual clock for the embedded store, a sleep for etcd). Panics on the first violation.
pub async fn store_contract<S: Store>(s: &S, advance: impl Fn(Duration)) {
    let mut watch = s.watch();
    let r1 = s
        .commit(
            Txn::default()
                .check("obj/a".into(), Precondition::Absent)
                .put("obj/a".into(), b"1".to_vec()),
        )
        .await
        .unwrap();
    let got = s.get("obj/a").await.unwrap();
    assert_eq!((got.value.as_slice(), got.mod_revision), (&b"1"[..], r1));
    assert!(matches!(
        s.get("obj/missing").await,
        Err(StoreError::NotFound(_))
    ));

    // Preconditions: Absent on an existing key, stale revision, Present on a missing key.
    let e = s
        .commit(
            Txn::default()
                .check("obj/a".into(), Precondition::Absent)
                .put("obj/a".into(), b"x".to_vec()),
        )
        .await;
    assert!(matches!(e, Err(StoreError::Conflict(_))), "{e:?}");
    let r2 = s
        .commit(
            Txn::default()
                .check("obj/a".into(), Precondition::Revision(r1))
                .put("obj/a".into(), b"2".to_vec()),
        )
        .await
        .unwrap();
    assert!(r2 > r1);
    let e = s
        .commit(
            Txn::default()
                .check("obj/a".into(), Precondition::Revision(r1))
                .put("obj/a".into(), b"3".to_vec()),
        )
        .await;
    assert!(matches!(e, Err(StoreError::Conflict(_))));
    let e = s
        .commit(
            Txn::default()
                .check("obj/none".into(), Precondition::Present)
                .delete("obj/a".into()),
        )
        .await;
    assert!(matches!(e, Err(StoreError::Conflict(_))));
    assert_eq!(
        s.get("obj/a").await.unwrap().value,
        b"2",
        "a failed transaction changes nothing"
    );

    // Multi-key atomic transaction, then list by prefix.
    let r3 = s
        .commit(
            Txn::default()
                .put("obj/b".into(), b"b".to_vec())
                .put("obj/c".into(), b"c".to_vec())
                .delete("obj/a".into()),
        )
        .await
        .unwrap();
    let (all, rev) = s.list("obj/").await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["obj/b", "obj/c"]
    );
    assert_eq!(rev, r3);
    assert!(s.list("meta/").await.unwrap().0.is_empty());

    // The watch saw every committed change, in order, and nothing of the failed ones.
    let mut seen = Vec::new();
    while let Ok(c) = watch.try_recv() {
        seen.push(c);
    }
    assert_eq!(
        seen.iter().map(|c| c.revision).collect::<Vec<_>>(),
        [r1, r2, r3]
    );
    assert!(matches!(
        &seen[2].events[..],
        [Event::Put(_), Event::Put(_), Event::Delete { .. }]
    ));

    // Leases expire by the clock and can be revoked.
    s.keep_alive("replica-a", Duration::from_secs(10))
        .await
        .unwrap();
    s.keep_alive("replica-b", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(s.leases().await.unwrap().len(), 2);
    advance(Duration::from_secs(11));
    assert_eq!(
        s.leases().await.unwrap().keys().collect::<Vec<_>>(),
        ["replica-b"]
    );
    s.revoke("replica-b").await.unwrap();
    assert!(s.leases().await.unwrap().is_empty());
}
