//! `cargo xtask sizing`: the state partition an appliance needs to keep its
//! audit trail for the retention period (hardware/SIZING.md explains the
//! inputs, which are measured and which are estimates).

use airlock_hardware::sizing::{SizingInput, HIPAA_RETENTION_YEARS};
use anyhow::{ensure, Result};

/// Inputs; defaults are SIZING.md's.
#[derive(Debug, clap::Args)]
pub struct SizingArgs {
    /// Audit records per day per appliance (ESTIMATE until the audit trail exists).
    #[arg(long, default_value_t = 2_000.0)]
    pub audit_records_per_day: f64,
    /// Bytes per stored audit record, store overhead included (ESTIMATE).
    #[arg(long, default_value_t = 700.0)]
    pub audit_record_bytes: f64,
    /// Years the audit trail is kept on the appliance.
    #[arg(long, default_value_t = HIPAA_RETENTION_YEARS)]
    pub years: u32,
    /// Drop events logged per day (the kernel's budget caps this: 200 per CPU per second).
    #[arg(long, default_value_t = 50_000.0)]
    pub drop_events_per_day: f64,
    /// Bytes per drop-event log line (MEASURED: JSON line of the real agent).
    #[arg(long, default_value_t = 330.0)]
    pub drop_event_bytes: f64,
    /// Days of drop events kept (operational log, not HIPAA documentation).
    #[arg(long, default_value_t = 90)]
    pub drop_event_days: u32,
    /// Fixed state: policy store, keys, certificates (MEASURED on the image, rounded up).
    #[arg(long, default_value_t = 16.0 * 1024.0 * 1024.0)]
    pub fixed_bytes: f64,
    /// Free-space factor (store compaction, error in the estimates).
    #[arg(long, default_value_t = 2.0)]
    pub headroom: f64,
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / f64::from(1u32 << 30))
}

pub fn run(a: &SizingArgs) -> Result<()> {
    for (name, v) in [
        ("--audit-records-per-day", a.audit_records_per_day),
        ("--audit-record-bytes", a.audit_record_bytes),
        ("--drop-events-per-day", a.drop_events_per_day),
        ("--drop-event-bytes", a.drop_event_bytes),
        ("--fixed-bytes", a.fixed_bytes),
        ("--headroom", a.headroom),
    ] {
        ensure!(v.is_finite() && v >= 0.0, "{name} must be a number >= 0, not {v}");
    }
    let audit = SizingInput {
        bytes_per_record: a.audit_record_bytes,
        records_per_day: a.audit_records_per_day,
        retention_years: a.years,
        fixed_bytes: a.fixed_bytes,
        headroom: a.headroom,
    }
    .size();
    // Drop events: a rolling window of days, not years.
    let drops = a.drop_events_per_day * f64::from(a.drop_event_days) * a.drop_event_bytes;
    let total = audit.partition_bytes + drops * a.headroom.max(1.0);
    println!(
        "audit trail: {:.0} records/day x {:.0} B x {} years = {:.1} M records, {}",
        a.audit_records_per_day,
        a.audit_record_bytes,
        a.years,
        audit.records / 1e6,
        gib(audit.data_bytes - a.fixed_bytes)
    );
    println!("fixed state: {}", gib(a.fixed_bytes));
    println!(
        "drop events: {:.0}/day x {:.0} B x {} days = {}",
        a.drop_events_per_day,
        a.drop_event_bytes,
        a.drop_event_days,
        gib(drops)
    );
    println!("headroom x{:.1}", a.headroom);
    println!("state partition: at least {}", gib(total));
    println!(
        "disk: at least {} (image 1.0 GiB + state partition)",
        gib(total + f64::from(1u32 << 30))
    );
    Ok(())
}
