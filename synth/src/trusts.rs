//! The synthetic trusts: public identity plus the catchment each one serves.

/// One NHS trust taking part in the synthetic federation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrustSpec {
    /// ODS-style organisation code, used as the directory name and id prefix.
    pub code: &'static str,
    /// Human-readable trust name.
    pub name: &'static str,
    /// Fraction of all patient rows held by this trust; shares sum to 1.
    pub share: f64,
}

/// An outward postcode in a trust's catchment and its typical IMD decile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outward {
    pub code: &'static str,
    pub imd_decile: i32,
}

/// A trust together with its catchment area.
pub(crate) struct TrustDef {
    pub spec: TrustSpec,
    pub catchment: &'static [Outward],
}

const fn out(code: &'static str, imd_decile: i32) -> Outward {
    Outward { code, imd_decile }
}

/// The fixed federation used by [`crate::generate`]: a large teaching trust,
/// a mid-sized district trust and a small community trust.
pub(crate) const TRUSTS: [TrustDef; 3] = [
    TrustDef {
        spec: TrustSpec {
            code: "RXA",
            name: "Northfield Teaching Hospitals NHS Foundation Trust",
            share: 0.60,
        },
        catchment: &[
            out("LS1", 3),
            out("LS2", 4),
            out("LS4", 3),
            out("LS6", 5),
            out("LS7", 3),
            out("LS8", 4),
            out("LS9", 1),
            out("LS11", 2),
            out("LS12", 3),
            out("LS13", 4),
            out("LS14", 2),
            out("LS15", 6),
            out("LS16", 9),
            out("LS17", 8),
            out("LS18", 9),
            out("LS25", 7),
            out("LS26", 6),
            out("LS27", 6),
            out("LS28", 6),
            out("LS29", 10),
        ],
    },
    TrustDef {
        spec: TrustSpec {
            code: "RXB",
            name: "Riverside and Vale NHS Trust",
            share: 0.32,
        },
        catchment: &[
            out("YO1", 6),
            out("YO10", 5),
            out("YO23", 7),
            out("YO24", 6),
            out("YO26", 7),
            out("YO30", 6),
            out("YO31", 4),
            out("YO32", 7),
            out("YO41", 9),
            out("YO60", 8),
            out("YO61", 8),
            out("YO62", 9),
            out("HG1", 6),
            out("HG2", 8),
            out("HG3", 9),
            out("HG5", 9),
        ],
    },
    TrustDef {
        spec: TrustSpec {
            code: "RXC",
            name: "Fenmoor Community Hospital NHS Trust",
            share: 0.08,
        },
        catchment: &[
            out("PE1", 2),
            out("PE2", 4),
            out("PE3", 5),
            out("PE4", 6),
            out("PE7", 6),
            out("PE13", 3),
            out("PE14", 4),
            out("PE15", 3),
            out("PE16", 5),
            out("PE38", 4),
        ],
    },
];

/// The three trusts of the default federation, in generation order.
pub fn default_trusts() -> Vec<TrustSpec> {
    TRUSTS.iter().map(|t| t.spec).collect()
}
