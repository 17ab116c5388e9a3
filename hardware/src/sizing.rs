//! Storage sizing for the appliance's state partition over the retention
//! period (hardware/SIZING.md explains the inputs and which are measured).
//!
//! Pure arithmetic: the caller supplies bytes per record and event rates.

/// HIPAA's documentation retention (45 CFR 164.316(b)(2)): six years.
pub const HIPAA_RETENTION_YEARS: u32 = 6;

/// The model's inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizingInput {
    /// Bytes one stored record takes on disk (record + its share of the
    /// store's overhead).
    pub bytes_per_record: f64,
    /// Records written per day (audit records, drop-event summaries).
    pub records_per_day: f64,
    /// Years kept on the appliance before they may be dropped.
    pub retention_years: u32,
    /// State that does not grow with time (policy store, keys), in bytes.
    pub fixed_bytes: f64,
    /// Multiplier for free space the store needs to compact and for error in
    /// the inputs (2.0 = twice the data).
    pub headroom: f64,
}

/// The model's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizing {
    /// Records kept over the retention period.
    pub records: f64,
    /// Bytes of those records plus the fixed state.
    pub data_bytes: f64,
    /// What the state partition should hold (data × headroom).
    pub partition_bytes: f64,
}

/// Days per year on average (leap years included).
const DAYS_PER_YEAR: f64 = 365.25;

impl SizingInput {
    /// The storage needed.
    pub fn size(&self) -> Sizing {
        let records = self.records_per_day * DAYS_PER_YEAR * f64::from(self.retention_years);
        let data_bytes = records * self.bytes_per_record + self.fixed_bytes;
        Sizing { records, data_bytes, partition_bytes: data_bytes * self.headroom.max(1.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_years_of_a_thousand_records_a_day() {
        let s = SizingInput {
            bytes_per_record: 500.0,
            records_per_day: 1000.0,
            retention_years: HIPAA_RETENTION_YEARS,
            fixed_bytes: 1_000_000.0,
            headroom: 2.0,
        }
        .size();
        assert_eq!(s.records, 2_191_500.0);
        assert_eq!(s.data_bytes, 2_191_500.0 * 500.0 + 1_000_000.0);
        assert_eq!(s.partition_bytes, s.data_bytes * 2.0);
    }

    #[test]
    fn headroom_below_one_is_treated_as_one() {
        let s = SizingInput {
            bytes_per_record: 1.0,
            records_per_day: 0.0,
            retention_years: 6,
            fixed_bytes: 10.0,
            headroom: 0.5,
        }
        .size();
        assert_eq!(s.partition_bytes, 10.0);
    }
}
