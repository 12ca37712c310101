//! Compile-time rules of `#[idempotent]`: each misuse in `tests/ui/fail/` fails with the message
//! in its `.stderr`; every form in `tests/ui/pass/` compiles.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
