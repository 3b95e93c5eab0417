use super::*;

#[test]
fn numbers_compare_by_value() {
    assert!(same(&json!({"a": [2.0, 1]}), &json!({"a": [2, 1.0]})));
    assert!(same(
        &json!(12345678901234567891u64),
        &json!(12345678901234567000.0)
    ));
    assert!(!same(&json!({"a": 1}), &json!({"a": 2})));
    assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    assert!(!same(&json!("1"), &json!(1)));
}
