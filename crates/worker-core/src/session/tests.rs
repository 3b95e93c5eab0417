use super::*;

#[test]
fn bounded_ids_forget_the_oldest() {
    let mut ids = BoundedIds::new(2);
    assert!(ids.insert("a".into()) && ids.insert("b".into()));
    assert!(!ids.insert("a".into()), "known ids are reported");
    assert!(ids.insert("c".into()));
    assert!(ids.insert("a".into()), "the oldest was forgotten");
    assert!(ids.remove("c") && !ids.remove("c"));
    assert!(ids.ids.len() <= 2 && ids.order.len() <= 2);
}

#[test]
fn backoff_is_bounded_and_resets() {
    let mut b = Backoff::default();
    for n in 0..40u32 {
        let w = b.next();
        let ceiling = BACKOFF_BASE.saturating_mul(1 << n.min(16)).min(BACKOFF_CAP);
        assert!(w <= ceiling, "attempt {n}: {w:?} > {ceiling:?}");
    }
    assert_eq!(b.attempt, 40);
    b.reset();
    assert!(b.next() <= BACKOFF_BASE);
}
