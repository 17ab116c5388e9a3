//! Any text as a policy file: parsing, validation, location of every issue
//! and compilation never panic, and a valid policy survives the JSON form.
#![no_main]

use airlock_policy::{check_json, check_toml, compile, Now};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match check_toml(text) {
        Ok((policy, resolved)) => {
            let now = Now { unix_secs: 1_795_392_000, mono_ns: 1_000_000_000 };
            let _ = compile(&resolved, &[], now);
            let json = serde_json::to_string(&policy).expect("a policy serializes");
            assert!(check_json(&json).is_ok(), "valid TOML policy rejected as JSON");
        }
        Err(diags) => assert!(!diags.is_empty(), "an error without a diagnostic"),
    }
});
