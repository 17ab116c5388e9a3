//! Integration tests of the KMS backends: built-in (keyfile and passphrase), PKCS#11
//! against the real SoftHSM2 library, and Vault Transit against the Vault Transit
//! stand-in (not Vault) over real HTTP.

#[path = "kms/vault_standin.rs"]
mod vault_standin;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use airlock_kms::{
    BuiltinKms, KdfParams, Kms, KmsConfig, KmsError, Pkcs11Config, Pkcs11Kms, Protection,
    SecretString, VaultTransitConfig, VaultTransitKms, WrappedKey,
};
use vault_standin::VaultStandin;

const DEK: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
/// Cheap Argon2id costs so debug-build tests stay fast; one test uses the defaults.
const TEST_KDF: KdfParams = KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 };

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn flip_last(w: &WrappedKey) -> WrappedKey {
    let mut t = w.clone();
    let last = t.ciphertext.len() - 1;
    t.ciphertext[last] ^= 0x01;
    t
}

/// What every backend must do: round trip, context binding, tamper detection,
/// rotation with old versions readable, rewrap to the newest version.
fn exercise(kms: &dyn Kms) {
    let v1 = kms.current_version().expect("current version");
    let w = kms.wrap(DEK, b"tree-a").expect("wrap");
    assert_eq!(w.kek_version, v1);
    assert_ne!(&w.ciphertext[..], &DEK[..], "the wrapped key is not the key");
    assert_eq!(&kms.unwrap(&w, b"tree-a").expect("unwrap")[..], &DEK[..]);
    let wrong_ctx = kms.unwrap(&w, b"tree-b").expect_err("another context must not unwrap");
    assert!(matches!(wrong_ctx, KmsError::UnwrapFailed { .. }), "{wrong_ctx:?}");
    let tampered = kms.unwrap(&flip_last(&w), b"tree-a").expect_err("tampered must not unwrap");
    assert!(matches!(tampered, KmsError::UnwrapFailed { .. }), "{tampered:?}");

    let v2 = kms.rotate().expect("rotate");
    assert_eq!(v2, v1 + 1);
    assert_eq!(kms.current_version().expect("current version"), v2);
    assert_eq!(&kms.unwrap(&w, b"tree-a").expect("old version still unwraps")[..], &DEK[..]);
    let w2 = kms.wrap(DEK, b"tree-a").expect("wrap after rotation");
    assert_eq!(w2.kek_version, v2, "new wraps use the new version");
    let re = kms.rewrap(&w, b"tree-a").expect("rewrap");
    assert_eq!(re.kek_version, v2);
    assert_ne!(re.ciphertext, w.ciphertext);
    assert_eq!(&kms.unwrap(&re, b"tree-a").expect("unwrap rewrapped")[..], &DEK[..]);
    assert!(kms.rewrap(&w, b"tree-b").is_err(), "rewrap checks the context too");
}

// ---------------------------------------------------------------- built-in

#[test]
fn builtin_keyfile_round_trip_rotation_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek.json");
    let kms = BuiltinKms::create(&path, Protection::Keyfile).expect("create");
    assert_eq!(kms.backend(), "builtin");
    assert_eq!(fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
    exercise(&kms);
    let w1 = kms.wrap(DEK, b"ctx").expect("wrap");
    drop(kms);

    // A restart: the versions come back from the file.
    let kms = BuiltinKms::open(&path, Protection::Keyfile).expect("open");
    assert_eq!(kms.versions(), vec![1, 2]);
    assert_eq!(&kms.unwrap(&w1, b"ctx").expect("unwrap after restart")[..], &DEK[..]);
    assert!(!path.with_file_name("kek.json.tmp").exists(), "no temporary file left behind");

    // Retiring version 1 makes v1-wrapped keys unreadable, rewrapped ones stay.
    let v1_wrapped = WrappedKey { kek_version: 1, ..kms.wrap(DEK, b"ctx").expect("wrap") };
    assert_eq!(kms.retire_before(2).expect("retire"), 1);
    let err = kms.unwrap(&v1_wrapped, b"ctx").expect_err("retired version");
    assert!(matches!(err, KmsError::UnknownVersion { version: 1, .. }), "{err:?}");
    let kms = BuiltinKms::open(&path, Protection::Keyfile).expect("reopen");
    assert_eq!(kms.versions(), vec![2]);
    assert_eq!(&kms.unwrap(&w1, b"ctx").expect("v2 key still unwraps")[..], &DEK[..]);
}

#[test]
fn builtin_create_refuses_an_existing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek.json");
    BuiltinKms::create(&path, Protection::Keyfile).expect("create");
    let before = fs::read(&path).expect("read");
    let err = BuiltinKms::create(&path, Protection::Keyfile).expect_err("second create");
    assert!(matches!(err, KmsError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(fs::read(&path).expect("read"), before, "the existing file is untouched");
}

#[test]
fn builtin_keyfile_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek.json");
    BuiltinKms::create(&path, Protection::Keyfile).expect("create");
    for mode in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        let err = BuiltinKms::open(&path, Protection::Keyfile).expect_err("group/world access");
        assert!(
            matches!(err, KmsError::InsecurePermissions { mode: m, .. } if m == mode),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"), "{text}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    BuiltinKms::open(&path, Protection::Keyfile).expect("0600 opens");
}

#[test]
fn builtin_passphrase_seals_the_keys_and_rejects_a_wrong_passphrase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek.json");
    let pass = secret("correct horse battery staple");
    let kms = BuiltinKms::create_with_params(&path, Protection::Passphrase(&pass), TEST_KDF)
        .expect("create");
    exercise(&kms);
    let w = kms.wrap(DEK, b"ctx").expect("wrap");
    drop(kms);

    let text = fs::read_to_string(&path).expect("read");
    assert!(
        text.contains("\"sealed\"") && !text.contains("\"keys\""),
        "no key in the clear: {text}"
    );

    let kms = BuiltinKms::open(&path, Protection::Passphrase(&pass)).expect("right passphrase");
    assert_eq!(kms.versions(), vec![1, 2], "rotation re-sealed the file");
    assert_eq!(&kms.unwrap(&w, b"ctx").expect("unwrap")[..], &DEK[..]);

    let wrong = secret("correct horse battery stapler");
    let err =
        BuiltinKms::open(&path, Protection::Passphrase(&wrong)).expect_err("wrong passphrase");
    assert!(matches!(err, KmsError::WrongPassphrase { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("wrong passphrase") && !shown.contains("stapler"), "{shown}");

    let err = BuiltinKms::open(&path, Protection::Keyfile).expect_err("configured as keyfile");
    assert!(matches!(err, KmsError::ProtectionMismatch { .. }), "{err:?}");

    // An altered sealed file does not open either.
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let sealed = v["sealed"].as_str().expect("sealed").to_owned();
    let mut chars: Vec<char> = sealed.chars().collect();
    chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
    v["sealed"] = chars.into_iter().collect::<String>().into();
    fs::write(&path, v.to_string()).expect("write");
    let err = BuiltinKms::open(&path, Protection::Passphrase(&pass)).expect_err("altered file");
    assert!(matches!(err, KmsError::WrongPassphrase { .. }), "{err:?}");
}

#[test]
fn builtin_passphrase_with_default_argon2id_costs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek.json");
    let pass = secret("a longer passphrase for the default costs");
    let kms = BuiltinKms::create(&path, Protection::Passphrase(&pass)).expect("create");
    let w = kms.wrap(DEK, b"ctx").expect("wrap");
    let text = fs::read_to_string(&path).expect("read");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["kdf"]["algorithm"], "argon2id");
    assert_eq!(v["kdf"]["m_cost_kib"], 65536);
    assert_eq!(v["kdf"]["t_cost"], 3);
    let kms = BuiltinKms::open(&path, Protection::Passphrase(&pass)).expect("open");
    assert_eq!(&kms.unwrap(&w, b"ctx").expect("unwrap")[..], &DEK[..]);
}

#[test]
fn config_open_needs_its_secret_and_hides_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg: KmsConfig = serde_json::from_value(serde_json::json!({
        "backend": "builtin", "key_file": dir.path().join("kek.json"), "protection": "passphrase"
    }))
    .expect("config");
    let err = airlock_kms::open(&cfg, None).expect_err("no passphrase");
    assert!(matches!(err, KmsError::MissingSecret { backend: "builtin", .. }), "{err:?}");

    let cfg: KmsConfig = serde_json::from_value(serde_json::json!({
        "backend": "builtin", "key_file": dir.path().join("kek2.json")
    }))
    .expect("config");
    let kms: Arc<dyn Kms> = airlock_kms::open(&cfg, None).expect("keyfile needs no secret");
    let w = kms.wrap(DEK, b"c").expect("wrap");
    assert_eq!(&kms.unwrap(&w, b"c").expect("unwrap")[..], &DEK[..]);
    assert!(
        !format!("{w:?}").contains("ciphertext:"),
        "Debug of a wrapped key shows only its length"
    );
}

// ---------------------------------------------------------------- PKCS#11 (SoftHSM2)

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A private SoftHSM2 configuration and token store in a temporary directory, with one
/// fresh token. SOFTHSM2_CONF is process-wide: only this test binary's single PKCS#11
/// test sets it.
fn softhsm_token(dir: &Path, label: &str, so_pin: &str, pin: &str) -> PathBuf {
    let tokens = dir.join("tokens");
    fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin])
        .output()
        .expect("run softhsm2-util (apt package softhsm2)");
    assert!(status.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&status.stderr));
    conf
}

#[test]
fn pkcs11_softhsm2_round_trip_rotation_restart_and_wrong_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = softhsm_token(dir.path(), "airlock-test", "5678", "1234");
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let cfg = Pkcs11Config {
        module: SOFTHSM.into(),
        token_label: "airlock-test".into(),
        key_label: "airlock-kek".into(),
    };

    let err = Pkcs11Kms::open(&cfg, &secret("0000")).expect_err("wrong PIN");
    assert!(matches!(err, KmsError::Pkcs11 { op: "C_Login", .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("0000"), "the PIN is not in the error");

    let missing = Pkcs11Config { token_label: "no-such-token".into(), ..cfg.clone() };
    let err = Pkcs11Kms::open(&missing, &secret("1234")).expect_err("unknown token");
    assert!(matches!(err, KmsError::TokenNotFound { .. }), "{err:?}");

    let kms = Pkcs11Kms::open(&cfg, &secret("1234")).expect("open");
    assert_eq!(kms.backend(), "pkcs11");
    assert_eq!(kms.versions(), vec![1], "first open generates airlock-kek-v1");
    exercise(&kms);
    let w = kms.wrap(DEK, b"ctx").expect("wrap");
    drop(kms);

    // A restart finds both key objects in the token.
    let kms = Pkcs11Kms::open(&cfg, &secret("1234")).expect("reopen");
    assert_eq!(kms.versions(), vec![1, 2]);
    assert_eq!(w.kek_version, 2);
    assert_eq!(&kms.unwrap(&w, b"ctx").expect("unwrap after restart")[..], &DEK[..]);
    drop(kms);

    // The key objects are sensitive and not extractable: the KEK never leaves the token.
    assert_key_objects_locked(&cfg, "1234");
}

fn assert_key_objects_locked(cfg: &Pkcs11Config, pin: &str) {
    use cryptoki::{
        context::Pkcs11,
        object::{Attribute, AttributeType, ObjectClass},
        session::UserType,
    };
    let ctx = Pkcs11::new(&cfg.module).expect("module");
    ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ))
    .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| ctx.get_token_info(*s).expect("token info").label().trim_end() == cfg.token_label)
        .expect("token");
    let session = ctx.open_ro_session(slot).expect("session");
    session
        .login(UserType::User, Some(&secret(pin)))
        .or_else(|e| match e {
            cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _) => {
                Ok(())
            }
            e => Err(e),
        })
        .expect("login");
    let keys = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)]).expect("find");
    assert_eq!(keys.len(), 2);
    for k in keys {
        let attrs = session
            .get_attributes(
                k,
                &[AttributeType::Sensitive, AttributeType::Extractable, AttributeType::Token],
            )
            .expect("attributes");
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
    }
}

// ---------------------------------------------------------------- Vault Transit stand-in

fn vault_cfg(standin: &VaultStandin, key: &str, derived: bool) -> VaultTransitConfig {
    VaultTransitConfig {
        address: standin.address(),
        mount: "transit".into(),
        key: key.into(),
        derived,
        create_key: true,
        ca_file: None,
        timeout_secs: 5,
    }
}

#[test]
fn vault_transit_standin_round_trip_rotation_rewrap() {
    let standin = VaultStandin::start("s.test-token");
    let kms =
        VaultTransitKms::connect(vault_cfg(&standin, "airlock", true), secret("s.test-token"))
            .expect("connect creates the key");
    assert_eq!(kms.backend(), "vault-transit");
    exercise(&kms);
    let w = kms.wrap(DEK, b"ctx").expect("wrap");
    assert!(std::str::from_utf8(&w.ciphertext).expect("text").starts_with("vault:v2:"));

    let reqs = standin.requests();
    for expected in [
        "GET /v1/transit/keys/airlock",
        "POST /v1/transit/keys/airlock",
        "POST /v1/transit/encrypt/airlock",
        "POST /v1/transit/decrypt/airlock",
        "POST /v1/transit/keys/airlock/rotate",
        "POST /v1/transit/rewrap/airlock",
    ] {
        assert!(reqs.iter().any(|r| r == expected), "{expected} not in {reqs:?}");
    }

    // A second client (a restart) reads the existing key instead of creating one.
    let again =
        VaultTransitKms::connect(vault_cfg(&standin, "airlock", true), secret("s.test-token"))
            .expect("reconnect");
    assert_eq!(again.current_version().expect("version"), 2);
    assert_eq!(&again.unwrap(&w, b"ctx").expect("unwrap")[..], &DEK[..]);
}

#[test]
fn vault_transit_standin_refuses_a_wrong_token_and_a_derived_mismatch() {
    let standin = VaultStandin::start("s.right");
    let err = VaultTransitKms::connect(vault_cfg(&standin, "k", true), secret("s.wrong"))
        .expect_err("token");
    assert!(matches!(err, KmsError::Vault { status: 403, .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("s.wrong"), "the token is not in the error");

    VaultTransitKms::connect(vault_cfg(&standin, "k", true), secret("s.right"))
        .expect("create derived");
    let err = VaultTransitKms::connect(vault_cfg(&standin, "k", false), secret("s.right"))
        .expect_err("configured underived for a derived key");
    assert!(matches!(err, KmsError::VaultResponse { .. }), "{err:?}");

    let kms = VaultTransitKms::connect(vault_cfg(&standin, "plain", false), secret("s.right"))
        .expect("underived");
    let w = kms.wrap(DEK, b"ignored").expect("wrap");
    assert_eq!(
        &kms.unwrap(&w, b"other").expect("underived keys do not bind context")[..],
        &DEK[..]
    );
    assert!(!format!("{kms:?}").contains("s.right"), "Debug hides the token");
}

#[test]
fn vault_transit_standin_min_decryption_version_proves_rewrap() {
    let standin = VaultStandin::start("tok");
    let kms = VaultTransitKms::connect(vault_cfg(&standin, "airlock", true), secret("tok"))
        .expect("connect");
    let w1 = kms.wrap(DEK, b"ctx").expect("wrap");
    kms.rotate().expect("rotate");
    let re = kms.rewrap(&w1, b"ctx").expect("rewrap");
    // Retire version 1 in Vault, as an operator would after a rotation.
    let agent = ureq::Agent::new_with_defaults();
    agent
        .post(&format!("{}/v1/transit/keys/airlock/config", standin.address()))
        .header("X-Vault-Token", "tok")
        .send(r#"{"min_decryption_version": 2}"#)
        .expect("config");
    let err = kms.unwrap(&w1, b"ctx").expect_err("version 1 retired");
    assert!(matches!(err, KmsError::UnwrapFailed { version: 1, .. }), "{err:?}");
    assert_eq!(&kms.unwrap(&re, b"ctx").expect("rewrapped key")[..], &DEK[..]);
}
