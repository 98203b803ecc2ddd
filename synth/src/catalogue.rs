//! Clinical coding tables: admission methods and a weighted catalogue of
//! primary diagnoses, each with its usual specialty, procedures, length of
//! stay and tariff. Weights are per ~10,000 episodes of the same route, so
//! a weight of 1 or 2 gives a code seen only a handful of times at the
//! default scale.

use rand::Rng;

/// Route bit: elective (planned) admission.
pub(crate) const ELECTIVE: u8 = 1;
/// Route bit: emergency admission (including transfers in).
pub(crate) const EMERGENCY: u8 = 2;
/// Route bit: maternity admission.
pub(crate) const MATERNITY: u8 = 4;

/// First day of the COVID-19 codes (2020-03-01, days since the epoch).
const COVID_START: i32 = 18_322;

/// HES admission method codes with their route and weight. Maternity only
/// applies to women of child-bearing age; the rest give ~40% emergencies.
const METHODS: [(&str, u8, u32); 10] = [
    ("11", ELECTIVE, 250),
    ("12", ELECTIVE, 200),
    ("13", ELECTIVE, 70),
    ("21", EMERGENCY, 285),
    ("22", EMERGENCY, 60),
    ("23", EMERGENCY, 10),
    ("24", EMERGENCY, 20),
    ("28", EMERGENCY, 25),
    ("31", MATERNITY, 250),
    ("81", EMERGENCY, 30),
];

/// Picks an admission method among those whose route is in `routes`
/// (which must allow at least one), returning its code and route.
pub(crate) fn pick_method(rng: &mut impl Rng, routes: u8) -> (&'static str, u8) {
    let allowed = || METHODS.iter().filter(|m| m.1 & routes != 0);
    let total: u32 = allowed().map(|m| m.2).sum();
    let mut ticket = rng.random_range(0..total);
    for &(code, route, weight) in allowed() {
        if ticket < weight {
            return (code, route);
        }
        ticket -= weight;
    }
    unreachable!("ticket below total weight")
}

/// One primary diagnosis and how episodes with it usually look.
#[derive(Debug)]
pub(crate) struct Dx {
    /// ICD-10 code, e.g. "J18.9".
    pub code: &'static str,
    /// Relative frequency within each route it belongs to.
    weight: u32,
    /// Route bits this diagnosis is admitted under.
    pub routes: u8,
    /// Usual treatment function code.
    pub specialty: &'static str,
    /// Typical tariff in pounds, before length-of-stay costs.
    pub tariff: f64,
    /// Mean length of stay in days.
    pub los: f64,
    /// Plausible OPCS-4 primary procedures (empty: usually none).
    pub procedures: &'static [&'static str],
    /// Inclusive range of age at admission.
    ages: (i32, i32),
    /// Restricted to this sex ("F" or "M"), if any.
    sex: Option<&'static str>,
    /// Earliest admission day the code exists.
    not_before: i32,
}

const fn dx(
    code: &'static str,
    weight: u32,
    routes: u8,
    specialty: &'static str,
    tariff: f64,
    los: f64,
    procedures: &'static [&'static str],
) -> Dx {
    Dx {
        code,
        weight,
        routes,
        specialty,
        tariff,
        los,
        procedures,
        ages: (0, 105),
        sex: None,
        not_before: 0,
    }
}

impl Dx {
    const fn ages(mut self, min: i32, max: i32) -> Self {
        self.ages = (min, max);
        self
    }

    const fn female(mut self) -> Self {
        self.sex = Some("F");
        self
    }

    const fn male(mut self) -> Self {
        self.sex = Some("M");
        self
    }

    const fn since(mut self, day: i32) -> Self {
        self.not_before = day;
        self
    }

    /// Whether this diagnosis fits a patient of `sex` aged `age` on `day`.
    pub(crate) fn fits(&self, sex: &str, age: i32, day: i32) -> bool {
        (self.ages.0..=self.ages.1).contains(&age)
            && self.sex.is_none_or(|s| s == sex)
            && day >= self.not_before
    }
}

/// The planted rare diagnosis (see [`crate::PLANTED_DIAGNOSIS`]); it is
/// deliberately absent from [`CATALOGUE`].
pub(crate) const PLANTED: Dx = dx(
    crate::PLANTED_DIAGNOSIS,
    0,
    EMERGENCY,
    "300",
    2400.0,
    4.0,
    &["X29.2"],
);

const EL: u8 = ELECTIVE;
const EM: u8 = EMERGENCY;
const MAT: u8 = MATERNITY;

/// Primary diagnoses covering all 22 ICD-10 chapters.
const CATALOGUE: &[Dx] = &[
    // I: infectious and parasitic
    dx("A09.9", 220, EM, "300", 1400.0, 2.0, &["X29.2"]),
    dx("A41.9", 180, EM, "300", 3600.0, 8.0, &["X29.2", "U07.1"]),
    dx("A08.4", 90, EM, "300", 1200.0, 1.5, &["X29.2"]),
    dx("A04.7", 40, EM, "300", 3900.0, 10.0, &["X29.2"]).ages(16, 105),
    dx("B34.9", 70, EM, "300", 1100.0, 1.0, &[]),
    dx("A37.9", 2, EM, "420", 2200.0, 4.0, &[]).ages(0, 10),
    dx("A39.0", 1, EM, "300", 6500.0, 12.0, &["A55.9"]),
    dx("B05.9", 1, EM, "420", 1800.0, 3.0, &[]).ages(0, 40),
    // II: neoplasms
    dx(
        "C18.7",
        40,
        EL | EM,
        "100",
        6800.0,
        7.0,
        &["H10.9", "H22.9"],
    )
    .ages(30, 105),
    dx(
        "C34.1",
        50,
        EL | EM,
        "800",
        4200.0,
        5.0,
        &["E49.1", "X35.2"],
    )
    .ages(30, 105),
    dx("C50.9", 60, EL, "100", 3800.0, 1.5, &["B28.2", "B27.4"])
        .ages(25, 105)
        .female(),
    dx("C67.9", 35, EL, "101", 3100.0, 2.0, &["M42.1", "M45.9"]).ages(40, 105),
    dx("C25.9", 20, EM, "300", 4500.0, 9.0, &["X29.2"]).ages(40, 105),
    dx("C91.1", 15, EL, "800", 2900.0, 1.0, &["X35.2"]).ages(40, 105),
    dx("C71.9", 8, EL | EM, "800", 7200.0, 9.0, &["A02.1"]).ages(5, 90),
    dx("D25.9", 30, EL, "502", 4300.0, 3.0, &["Q07.4"])
        .ages(25, 60)
        .female(),
    dx("D12.6", 45, EL, "100", 1300.0, 0.3, &["H20.1", "H22.9"]).ages(30, 105),
    // III: blood and immune
    dx(
        "D50.9",
        60,
        EL | EM,
        "300",
        1300.0,
        1.5,
        &["X33.2", "G45.1"],
    )
    .ages(5, 105),
    dx("D64.9", 50, EM, "300", 1500.0, 3.0, &["X33.2"]),
    dx("D57.0", 8, EM, "300", 2600.0, 5.0, &["X33.2", "X29.2"]).ages(1, 70),
    dx("D69.6", 15, EM, "300", 1900.0, 3.0, &["X33.3"]),
    dx("D61.9", 1, EL, "300", 5800.0, 10.0, &["X33.2"]),
    // IV: endocrine, nutritional and metabolic
    dx("E11.9", 50, EL | EM, "300", 1800.0, 3.0, &["X29.2"]).ages(25, 105),
    dx("E87.1", 60, EM, "430", 2200.0, 6.0, &["X29.2"]).ages(65, 105),
    dx("E10.1", 25, EM, "300", 2400.0, 3.0, &["X29.2"]).ages(5, 70),
    dx("E03.9", 10, EL, "300", 900.0, 0.5, &[]),
    dx("E66.9", 15, EL, "100", 6200.0, 2.0, &["G28.3"]).ages(18, 70),
    dx("E84.0", 3, EM, "340", 4100.0, 10.0, &["X29.2", "E85.2"]).ages(0, 50),
    // V: mental and behavioural
    dx("F10.0", 60, EM, "300", 900.0, 0.5, &[]).ages(14, 90),
    dx("F32.9", 25, EM, "300", 1400.0, 4.0, &[]).ages(12, 105),
    dx("F05.9", 35, EM, "430", 3100.0, 12.0, &["U05.1"]).ages(65, 105),
    dx("F01.9", 25, EM, "430", 3300.0, 15.0, &["U05.1"]).ages(60, 105),
    dx("F50.0", 3, EM, "300", 5200.0, 20.0, &[])
        .ages(12, 40)
        .female(),
    // VI: nervous system
    dx("G40.9", 70, EM, "400", 1700.0, 2.0, &["U05.1", "A84.1"]),
    dx("G45.9", 60, EM, "400", 1500.0, 1.5, &["U05.1"]).ages(30, 105),
    dx("G43.9", 40, EM, "400", 900.0, 0.5, &["U05.1"]).ages(8, 80),
    dx("G62.9", 12, EL, "400", 1600.0, 1.0, &["A84.6"]).ages(30, 105),
    dx("G47.3", 15, EL, "340", 800.0, 0.2, &["E85.2"]).ages(25, 90),
    dx("G61.0", 2, EM, "400", 8500.0, 18.0, &["X29.2"]),
    // VII: eye and adnexa
    dx("H25.9", 180, EL, "130", 1100.0, 0.05, &["C71.2", "C75.1"]).ages(50, 105),
    dx("H40.1", 20, EL, "130", 1400.0, 0.1, &["C60.1"]).ages(40, 105),
    dx("H33.0", 15, EL | EM, "130", 2700.0, 0.5, &["C79.2"]).ages(20, 95),
    dx("H35.3", 40, EL, "130", 700.0, 0.02, &["C79.4"]).ages(55, 105),
    // VIII: ear and mastoid
    dx("H66.9", 20, EM, "120", 800.0, 0.5, &[]).ages(0, 90),
    dx("H65.3", 25, EL, "120", 1000.0, 0.1, &["D15.1"]).ages(1, 10),
    dx("H81.1", 20, EM, "120", 900.0, 1.0, &[]).ages(30, 105),
    dx("H91.9", 5, EL, "120", 900.0, 0.1, &[]).ages(0, 105),
    // IX: circulatory
    dx("I21.4", 110, EM, "320", 4100.0, 5.0, &["K63.1", "K75.1"]).ages(30, 105),
    dx("I21.0", 30, EM, "320", 5200.0, 5.0, &["K75.1"]).ages(30, 105),
    dx(
        "I48.9",
        110,
        EL | EM,
        "320",
        1900.0,
        3.0,
        &["U20.1", "X50.3"],
    )
    .ages(30, 105),
    dx("I50.0", 100, EM, "320", 3200.0, 9.0, &["U20.1"]).ages(40, 105),
    dx("I63.9", 90, EM, "400", 4600.0, 14.0, &["U05.1", "X83.3"]).ages(30, 105),
    dx("I26.9", 40, EM, "300", 2600.0, 5.0, &["U07.1"]).ages(18, 105),
    dx("I70.2", 20, EL, "100", 5200.0, 4.0, &["L63.1", "L59.1"]).ages(45, 105),
    dx("I83.9", 25, EL, "100", 1500.0, 0.1, &["L84.2", "L88.2"]).ages(25, 85),
    dx(
        "I25.1",
        50,
        EL,
        "320",
        3900.0,
        2.0,
        &["K63.1", "K40.1", "K75.1"],
    )
    .ages(35, 105),
    dx("I35.0", 15, EL, "320", 9800.0, 5.0, &["K26.4", "K63.1"]).ages(55, 105),
    dx("I71.4", 8, EL, "100", 8900.0, 6.0, &["L27.1"]).ages(55, 105),
    dx("I40.9", 2, EM, "320", 3400.0, 7.0, &["U20.1"]),
    // X: respiratory
    dx("J18.9", 260, EM, "300", 2700.0, 7.0, &["U07.1", "X29.2"]),
    dx("J44.1", 150, EM, "340", 2600.0, 5.0, &["E85.2"]).ages(40, 105),
    dx("J45.9", 60, EM, "340", 1200.0, 1.5, &[]).ages(2, 90),
    dx("J21.9", 50, EM, "420", 1500.0, 2.0, &["E85.2"]).ages(0, 2),
    dx("J20.9", 40, EM, "300", 1100.0, 2.0, &[]),
    dx("J35.0", 30, EL, "120", 1700.0, 0.5, &["F34.1"]).ages(3, 40),
    dx("J32.9", 15, EL, "120", 1900.0, 0.3, &["E14.3"]).ages(16, 80),
    dx("J93.1", 15, EM, "340", 2900.0, 4.0, &["T12.3"]).ages(15, 60),
    dx("J84.1", 10, EL | EM, "340", 2400.0, 4.0, &["E49.1"]).ages(50, 105),
    dx("J69.0", 40, EM, "430", 3700.0, 10.0, &["X29.2"]).ages(65, 105),
    // XI: digestive
    dx("K35.8", 90, EM, "100", 3300.0, 3.0, &["H01.1", "H01.9"]).ages(3, 90),
    dx("K80.2", 80, EL, "100", 3400.0, 1.0, &["J18.3"]).ages(18, 95),
    dx("K81.0", 40, EM, "100", 3800.0, 5.0, &["J18.3"]).ages(18, 105),
    dx("K40.9", 45, EL, "100", 2600.0, 0.3, &["T20.1"]).ages(0, 100),
    dx("K57.3", 80, EL | EM, "100", 2200.0, 4.0, &["H22.9"]).ages(30, 105),
    dx("K92.2", 60, EM, "300", 2300.0, 4.0, &["G45.1", "X33.2"]).ages(16, 105),
    dx("K21.9", 50, EL, "300", 900.0, 0.1, &["G45.1"]).ages(16, 100),
    dx("K56.6", 35, EM, "100", 4200.0, 8.0, &["X29.2"]).ages(30, 105),
    dx("K85.9", 35, EM, "100", 3200.0, 7.0, &["X29.2"]).ages(18, 100),
    dx("K70.3", 20, EM, "300", 3500.0, 9.0, &["G45.1", "T46.1"]).ages(25, 90),
    dx("K50.9", 25, EL | EM, "300", 2200.0, 3.0, &["H22.9"]).ages(12, 85),
    dx("K29.7", 40, EM, "300", 1300.0, 1.5, &["G45.1"]).ages(16, 105),
    dx("K59.0", 35, EM, "300", 1000.0, 2.0, &[]),
    dx("K02.9", 15, EL, "120", 900.0, 0.1, &["F09.1"]).ages(2, 16),
    // XII: skin
    dx("L03.1", 110, EM, "300", 1900.0, 4.0, &["X29.2"]).ages(16, 105),
    dx("L02.4", 40, EM, "100", 1300.0, 1.0, &["S47.1"]),
    dx("L89.3", 15, EM, "430", 4300.0, 18.0, &["S57.1"]).ages(65, 105),
    dx("L40.0", 8, EL, "300", 1100.0, 1.0, &[]),
    dx("L51.2", 1, EM, "300", 9000.0, 21.0, &["X29.2"]),
    // XIII: musculoskeletal
    dx("M17.1", 70, EL, "110", 6300.0, 3.0, &["W40.1", "W41.1"]).ages(45, 100),
    dx("M16.1", 65, EL, "110", 6500.0, 3.5, &["W37.1", "W38.1"]).ages(45, 100),
    dx("M54.5", 50, EM, "110", 1200.0, 2.0, &["A52.1"]).ages(18, 100),
    dx("M51.2", 20, EL, "110", 4200.0, 2.0, &["V33.1"]).ages(20, 85),
    dx("M06.9", 20, EL, "300", 1100.0, 0.2, &["X29.2"]).ages(18, 95),
    dx("M81.9", 10, EL, "430", 900.0, 0.2, &["X29.2"])
        .ages(60, 105)
        .female(),
    dx("M10.9", 15, EM, "300", 1200.0, 2.0, &[]).ages(25, 100),
    dx("M75.1", 25, EL, "110", 3300.0, 0.3, &["O29.1"]).ages(30, 90),
    // XIV: genitourinary
    dx("N39.0", 200, EM, "300", 1900.0, 5.0, &["X29.2"]),
    dx("N17.9", 90, EM, "300", 3000.0, 8.0, &["X40.3", "X29.2"]).ages(18, 105),
    dx("N18.5", 30, EL, "300", 750.0, 0.1, &["X40.3"]).ages(18, 100),
    dx("N20.0", 35, EL | EM, "101", 2100.0, 1.0, &["M14.1"]).ages(18, 90),
    dx("N81.1", 20, EL, "502", 2900.0, 1.5, &["P22.1"])
        .ages(35, 95)
        .female(),
    dx("N92.0", 35, EL, "502", 1600.0, 0.2, &["Q18.1", "Q07.4"])
        .ages(16, 60)
        .female(),
    dx("N83.2", 20, EL | EM, "502", 2500.0, 1.0, &["Q43.2"])
        .ages(14, 70)
        .female(),
    dx("N43.3", 10, EL, "101", 1800.0, 0.2, &["N11.2"])
        .ages(18, 90)
        .male(),
    // XV: pregnancy, childbirth and the puerperium
    dx("O80.0", 300, MAT, "500", 1900.0, 1.5, &["R24.9"])
        .ages(15, 50)
        .female(),
    dx("O82.0", 80, MAT, "500", 3400.0, 3.0, &["R17.1"])
        .ages(15, 50)
        .female(),
    dx("O82.1", 70, MAT, "500", 4200.0, 3.5, &["R18.1"])
        .ages(15, 50)
        .female(),
    dx("O21.0", 40, MAT | EM, "502", 1100.0, 1.5, &["X29.2"])
        .ages(15, 50)
        .female(),
    dx("O03.9", 50, MAT | EM, "502", 1300.0, 0.3, &["Q11.2"])
        .ages(15, 50)
        .female(),
    dx("O14.1", 15, MAT, "500", 3600.0, 5.0, &[])
        .ages(15, 50)
        .female(),
    dx("O24.4", 30, MAT, "500", 1500.0, 1.0, &[])
        .ages(15, 50)
        .female(),
    dx("O47.0", 60, MAT, "500", 700.0, 0.5, &[])
        .ages(15, 50)
        .female(),
    dx("O72.1", 10, MAT, "500", 2300.0, 2.5, &["X33.2"])
        .ages(15, 50)
        .female(),
    dx("O00.1", 8, EM, "502", 2800.0, 1.5, &["Q22.3"])
        .ages(15, 50)
        .female(),
    // XVI: perinatal
    dx("P07.3", 40, EM, "420", 6800.0, 12.0, &["E85.2", "X29.2"]).ages(0, 0),
    dx("P59.9", 50, EM, "420", 1200.0, 2.0, &[]).ages(0, 0),
    dx("P22.1", 30, EM, "420", 2100.0, 3.0, &["E85.2"]).ages(0, 0),
    dx("P36.9", 5, EM, "420", 4800.0, 9.0, &["X29.2"]).ages(0, 0),
    // XVII: congenital
    dx("Q21.0", 6, EL, "320", 7800.0, 6.0, &["U20.1"]).ages(0, 17),
    dx("Q65.0", 4, EL, "110", 3100.0, 2.0, &[]).ages(0, 5),
    dx("Q53.1", 12, EL, "100", 1600.0, 0.1, &["N08.1"])
        .ages(0, 8)
        .male(),
    dx("Q35.9", 2, EL, "120", 4300.0, 3.0, &["F29.1"]).ages(0, 3),
    dx("Q90.9", 1, EM, "420", 2500.0, 4.0, &[]).ages(0, 60),
    // XVIII: symptoms and signs
    dx("R07.4", 250, EM, "320", 900.0, 0.8, &["U20.1"]).ages(16, 105),
    dx("R10.4", 220, EM, "100", 1000.0, 1.0, &["U08.2"]),
    dx("R06.0", 60, EM, "300", 1100.0, 1.5, &["U07.1"]),
    dx("R50.9", 70, EM, "300", 1000.0, 1.5, &[]),
    dx("R29.6", 70, EM, "430", 1600.0, 6.0, &["U05.1"]).ages(65, 105),
    dx("R56.8", 30, EM, "420", 1000.0, 1.0, &[]).ages(0, 15),
    dx("R41.0", 40, EM, "430", 1800.0, 5.0, &["U05.1"]).ages(65, 105),
    // XIX: injury and poisoning
    dx(
        "S72.0",
        110,
        EM,
        "110",
        7400.0,
        14.0,
        &["W46.1", "W19.1", "W37.1"],
    )
    .ages(55, 105),
    dx("S06.0", 60, EM, "100", 1200.0, 1.0, &["U05.1"]),
    dx("S52.5", 50, EM, "110", 1900.0, 0.5, &["W19.1", "W26.1"]),
    dx("S82.8", 35, EM, "110", 3400.0, 3.0, &["W19.1"]).ages(10, 100),
    dx("T81.4", 30, EM, "100", 3100.0, 7.0, &["S47.1", "X29.2"]).ages(16, 100),
    dx("T39.1", 45, EM, "300", 1100.0, 1.0, &["X29.2"]).ages(12, 85),
    dx("S42.2", 30, EM, "110", 2600.0, 2.0, &["W19.1"]).ages(16, 105),
    dx("S01.8", 25, EM, "100", 800.0, 0.3, &["S41.1"]),
    dx("T84.5", 10, EL | EM, "110", 8900.0, 12.0, &["W39.1"]).ages(40, 100),
    dx("T75.1", 1, EM, "420", 3600.0, 3.0, &["E85.1"]).ages(0, 80),
    // XX: external causes
    dx("W19.0", 15, EM, "430", 1500.0, 4.0, &["U05.1"]).ages(65, 105),
    dx("V43.5", 8, EM, "100", 2400.0, 2.0, &["U05.1"]).ages(17, 90),
    dx("X59.9", 5, EM, "300", 1000.0, 1.0, &[]),
    dx("W57.0", 1, EM, "300", 750.0, 0.5, &[]),
    dx("Y83.8", 5, EM, "100", 2900.0, 6.0, &["X29.2"]).ages(18, 100),
    // XXI: factors influencing health status
    dx("Z51.1", 220, EL, "800", 700.0, 0.02, &["X35.2"]).ages(16, 100),
    dx("Z51.0", 60, EL, "800", 650.0, 0.02, &["X67.1", "X65.3"]).ages(16, 100),
    dx("Z03.9", 40, EM, "300", 800.0, 0.5, &[]),
    dx("Z47.0", 15, EL, "110", 1400.0, 0.2, &["W28.3"]).ages(5, 90),
    dx("Z30.2", 10, EL, "502", 1300.0, 0.1, &["Q35.2"])
        .ages(25, 50)
        .female(),
    dx("Z45.0", 15, EL, "320", 3200.0, 1.0, &["K60.1", "K61.1"]).ages(40, 105),
    dx("Z49.1", 40, EL, "300", 650.0, 0.0, &["X40.3"]).ages(18, 100),
    // XXII: codes for special purposes
    dx("U07.1", 90, EM, "340", 3900.0, 8.0, &["E85.2", "X29.2"]).since(COVID_START),
    dx("U07.2", 15, EM, "300", 2900.0, 6.0, &["X29.2"]).since(COVID_START),
];

/// Per-route cumulative weight tables over [`CATALOGUE`].
pub(crate) struct Catalogue {
    /// `(route, [(cumulative weight, diagnosis)])`.
    routes: Vec<(u8, Vec<(u32, &'static Dx)>)>,
}

impl Catalogue {
    /// Builds the lookup tables.
    pub(crate) fn new() -> Self {
        let routes = [ELECTIVE, EMERGENCY, MATERNITY]
            .into_iter()
            .map(|route| {
                let mut total = 0;
                let table = CATALOGUE
                    .iter()
                    .filter(|d| d.routes & route != 0)
                    .map(|d| {
                        total += d.weight;
                        (total, d)
                    })
                    .collect();
                (route, table)
            })
            .collect();
        Self { routes }
    }

    /// Draws a diagnosis for `route` that fits the patient, by rejection
    /// sampling with a deterministic fallback to the first fitting entry.
    pub(crate) fn pick(
        &self,
        rng: &mut impl Rng,
        route: u8,
        sex: &str,
        age: i32,
        day: i32,
    ) -> &'static Dx {
        let table = self
            .routes
            .iter()
            .find(|(r, _)| *r == route)
            .map(|(_, t)| t.as_slice())
            .unwrap_or_default();
        let total = table.last().map_or(0, |&(t, _)| t);
        for _ in 0..24 {
            let ticket = rng.random_range(0..total);
            let dx = table[table.partition_point(|&(cum, _)| cum <= ticket)].1;
            if dx.fits(sex, age, day) {
                return dx;
            }
        }
        table
            .iter()
            .map(|&(_, d)| d)
            .find(|d| d.fits(sex, age, day))
            .unwrap_or(table[0].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_covers_every_chapter_and_never_the_planted_code() {
        let chapters: Vec<(String, String)> = crate::ICD10_CHAPTERS_CSV
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[1].to_string(), f[2].to_string())
            })
            .collect();
        assert_eq!(chapters.len(), 22);
        for (from, to) in &chapters {
            assert!(
                CATALOGUE
                    .iter()
                    .any(|d| &d.code[..3] >= from.as_str() && &d.code[..3] <= to.as_str()),
                "no code in {from}-{to}"
            );
        }
        assert!(CATALOGUE.iter().all(|d| d.code != crate::PLANTED_DIAGNOSIS));
    }

    #[test]
    fn every_patient_fits_some_diagnosis_per_route() {
        for age in 0..=105 {
            for sex in ["F", "M", "U"] {
                for route in [ELECTIVE, EMERGENCY] {
                    assert!(
                        CATALOGUE
                            .iter()
                            .any(|d| d.routes & route != 0 && d.fits(sex, age, 0))
                    );
                }
            }
        }
        for age in 15..=50 {
            assert!(
                CATALOGUE
                    .iter()
                    .any(|d| d.routes & MATERNITY != 0 && d.fits("F", age, 0))
            );
        }
    }
}
