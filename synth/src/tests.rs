//! End-to-end tests: generate small federations and check the Parquet output.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Date32Type, Float64Type, Int32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::episodes::{FIRST_DAY, LAST_DAY};
use crate::nhs_number::tests::is_valid;
use crate::*;

/// A fresh output directory, removed on drop.
struct OutDir(PathBuf);

impl OutDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tally-synth-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(tag: &str, patients: usize, seed: u64) -> (OutDir, Summary) {
    let out = OutDir::new(tag);
    let summary = generate(&out.0, &SynthConfig { patients, seed }).expect("generate");
    (out, summary)
}

fn codes() -> Vec<&'static str> {
    default_trusts().iter().map(|t| t.code).collect()
}

/// Reads a whole table as one batch.
fn table(dir: &Path, trust: &str, name: &str) -> RecordBatch {
    read(&dir.join(trust).join(format!("{name}.parquet")))
}

/// Reads a whole Parquet file as one batch.
fn read(path: &Path) -> RecordBatch {
    let file = File::open(path).expect("open");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("read");
    let schema = batches.first().expect("at least one batch").schema();
    arrow::compute::concat_batches(&schema, &batches).expect("concat")
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<Option<String>> {
    batch
        .column_by_name(column)
        .expect(column)
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn required(batch: &RecordBatch, column: &str) -> Vec<String> {
    strings(batch, column)
        .into_iter()
        .map(|v| v.expect("not null"))
        .collect()
}

fn int32s(batch: &RecordBatch, column: &str) -> Vec<i32> {
    let array = batch.column_by_name(column).expect(column);
    match array.data_type() {
        DataType::Date32 => array.as_primitive::<Date32Type>().values().to_vec(),
        _ => array.as_primitive::<Int32Type>().values().to_vec(),
    }
}

/// Calendar year of a non-negative Date32 day, by counting whole years.
fn year_of(mut day: i32) -> i32 {
    let mut year = 1970;
    loop {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let length = if leap { 366 } else { 365 };
        if day < length {
            return year;
        }
        day -= length;
        year += 1;
    }
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = fs::read(&path).expect("read");
                out.insert(path.strip_prefix(dir).expect("prefix").to_path_buf(), bytes);
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_byte_identical_files() {
    let (a, _) = run("det-a", 500, 7);
    let (b, _) = run("det-b", 500, 7);
    let (c, _) = run("det-c", 500, 8);
    let (fa, fb, fc) = (files(&a.0), files(&b.0), files(&c.0));
    let expected = 1 + 4 * codes().len();
    assert_eq!(fa.len(), expected, "{:?}", fa.keys().collect::<Vec<_>>());
    assert_eq!(fa, fb);
    assert_ne!(
        fa[Path::new("RXA/episodes.parquet")],
        fc[Path::new("RXA/episodes.parquet")]
    );
    assert!(fa.keys().all(|p| !p.to_string_lossy().ends_with(".tmp")));
}

/// Column name, type and nullability.
type Column<'a> = (&'a str, DataType, bool);

#[test]
fn schemas_match_the_contract() {
    let (out, _) = run("schema", 500, 1);
    let utf8 = DataType::Utf8;
    let expected: [(&str, Vec<Column>); 4] = [
        (
            "patients",
            vec![
                ("person_id", utf8.clone(), false),
                ("nhs_number", utf8.clone(), false),
                ("sex", utf8.clone(), false),
                ("year_of_birth", DataType::Int32, false),
                ("ethnicity", utf8.clone(), true),
                ("postcode", utf8.clone(), false),
                ("imd_decile", DataType::Int32, false),
            ],
        ),
        (
            "episodes",
            vec![
                ("episode_id", utf8.clone(), false),
                ("person_id", utf8.clone(), false),
                ("admission_date", DataType::Date32, false),
                ("discharge_date", DataType::Date32, false),
                ("admission_method", utf8.clone(), false),
                ("specialty", utf8.clone(), false),
                ("diagnosis_icd10", utf8.clone(), false),
                ("procedure_opcs4", utf8.clone(), true),
                ("age_at_admission", DataType::Int32, false),
                ("length_of_stay", DataType::Int32, false),
                ("cost", DataType::Float64, false),
            ],
        ),
        ("opt_outs", vec![("nhs_number", utf8.clone(), false)]),
        (
            "icd10_chapters",
            vec![
                ("chapter", utf8.clone(), false),
                ("code_from", utf8.clone(), false),
                ("code_to", utf8.clone(), false),
                ("title", utf8.clone(), false),
            ],
        ),
    ];
    for trust in codes() {
        for (name, fields) in &expected {
            let batch = table(&out.0, trust, name);
            let actual: Vec<Column> = batch
                .schema_ref()
                .fields()
                .iter()
                .map(|f| (f.name().as_str(), f.data_type().clone(), f.is_nullable()))
                .collect();
            assert_eq!(&actual, fields, "{trust}/{name}");
        }
        let reference = table(&out.0, trust, "icd10_chapters");
        assert_eq!(reference.num_rows(), 22);
        assert_eq!(
            required(&reference, "title")[3],
            "Endocrine, nutritional and metabolic diseases"
        );
    }
}

#[test]
fn planted_cohort_is_exact_at_every_scale() {
    for patients in [9, 500, 3_000] {
        let (out, _) = run("planted", patients, 11);
        for trust in codes() {
            let episodes = table(&out.0, trust, "episodes");
            let diagnosis = required(&episodes, "diagnosis_icd10");
            let person = required(&episodes, "person_id");
            let planted: Vec<&String> = diagnosis
                .iter()
                .zip(&person)
                .filter(|(d, _)| *d == PLANTED_DIAGNOSIS)
                .map(|(_, p)| p)
                .collect();
            if trust == PLANTED_TRUST {
                assert_eq!(planted.len(), PLANTED_EPISODES, "{patients}");
                assert_eq!(
                    planted.iter().collect::<BTreeSet<_>>().len(),
                    PLANTED_PATIENTS
                );
            } else {
                assert!(planted.is_empty(), "{trust} at {patients}");
            }
        }
    }
}

#[test]
fn shared_patients_link_across_trusts_by_nhs_number() {
    let (out, summary) = run("shared", 2_000, 5);
    // nhs_number -> [(trust, person_id, sex, year_of_birth)]
    let mut seen: BTreeMap<String, Vec<(&str, String, String, i32)>> = BTreeMap::new();
    for trust in codes() {
        let patients = table(&out.0, trust, "patients");
        let nhs = required(&patients, "nhs_number");
        assert_eq!(
            nhs.iter().collect::<BTreeSet<_>>().len(),
            nhs.len(),
            "unique within {trust}"
        );
        let rows = nhs
            .into_iter()
            .zip(required(&patients, "person_id"))
            .zip(required(&patients, "sex"))
            .zip(int32s(&patients, "year_of_birth"));
        for (((nhs, id), sex), yob) in rows {
            assert!(id.starts_with(&format!("{trust}-P")), "{id}");
            seen.entry(nhs).or_default().push((trust, id, sex, yob));
        }
    }
    let mut per_trust: BTreeMap<&str, usize> = BTreeMap::new();
    for rows in seen.values().filter(|rows| rows.len() > 1) {
        assert_eq!(rows.len(), 2, "a person attends at most two trusts");
        let (a, b) = (&rows[0], &rows[1]);
        assert_ne!(a.0, b.0, "different trusts");
        assert_ne!(a.1, b.1, "different person_id");
        assert_eq!((&a.2, a.3), (&b.2, b.3), "same sex and year of birth");
        *per_trust.entry(a.0).or_default() += 1;
        *per_trust.entry(b.0).or_default() += 1;
    }
    for (trust, summary) in codes().into_iter().zip(&summary.trusts) {
        let share =
            per_trust.get(trust).copied().unwrap_or_default() as f64 / summary.patients as f64;
        assert!((0.015..0.09).contains(&share), "{trust} shares {share}");
    }
}

#[test]
fn patients_are_plausible_and_opt_outs_are_their_own() {
    let (out, summary) = run("patients", 3_000, 3);
    for (trust, counts) in codes().into_iter().zip(&summary.trusts) {
        let patients = table(&out.0, trust, "patients");
        assert_eq!(patients.num_rows(), counts.patients);
        let nhs = required(&patients, "nhs_number");
        assert!(nhs.iter().all(|n| is_valid(n)), "{trust}: modulus 11");
        assert!(
            required(&patients, "sex")
                .iter()
                .all(|s| ["F", "M", "U"].contains(&s.as_str()))
        );
        assert!(
            int32s(&patients, "year_of_birth")
                .iter()
                .all(|y| (1919..=2024).contains(y))
        );
        assert!(
            int32s(&patients, "imd_decile")
                .iter()
                .all(|d| (1..=10).contains(d))
        );
        let ethnicity = strings(&patients, "ethnicity");
        let missing =
            ethnicity.iter().filter(|e| e.is_none()).count() as f64 / ethnicity.len() as f64;
        assert!(
            (0.01..0.1).contains(&missing),
            "{trust}: ethnicity missing {missing}"
        );
        assert!(
            ethnicity
                .iter()
                .flatten()
                .all(|e| e.len() == 1 && ("A"..="S").contains(&e.as_str()))
        );
        for postcode in required(&patients, "postcode") {
            let (outward, inward) = postcode.split_once(' ').expect("space");
            assert!(
                (2..=4).contains(&outward.len()) && inward.len() == 3,
                "{postcode}"
            );
            assert!(
                inward.as_bytes()[0].is_ascii_digit()
                    && inward[1..].bytes().all(|b| b.is_ascii_uppercase())
            );
        }

        let opted = required(&table(&out.0, trust, "opt_outs"), "nhs_number");
        assert_eq!(opted.len(), counts.opted_out);
        assert!(!opted.is_empty(), "{trust} has opt-outs");
        let known: BTreeSet<&String> = nhs.iter().collect();
        assert!(
            opted.iter().all(|n| known.contains(n)),
            "{trust}: opt-outs are own patients"
        );
        let rate = opted.len() as f64 / nhs.len() as f64;
        assert!(
            (0.015..0.05).contains(&rate),
            "{trust}: opt-out rate {rate}"
        );
    }
}

#[test]
fn episodes_are_consistent_with_patients() {
    let (out, summary) = run("episodes", 3_000, 9);
    let (mut total, mut emergency, mut no_procedure, mut extreme, mut diagnoses) =
        (0, 0, 0, 0, BTreeMap::<String, usize>::new());
    for (trust, counts) in codes().into_iter().zip(&summary.trusts) {
        let patients = table(&out.0, trust, "patients");
        let birth: BTreeMap<String, i32> = required(&patients, "person_id")
            .into_iter()
            .zip(int32s(&patients, "year_of_birth"))
            .collect();
        let episodes = table(&out.0, trust, "episodes");
        assert_eq!(episodes.num_rows(), counts.episodes);
        let ids = required(&episodes, "episode_id");
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len());
        assert!(ids.iter().all(|id| id.starts_with(&format!("{trust}-E"))));
        let person = required(&episodes, "person_id");
        let admission = int32s(&episodes, "admission_date");
        let discharge = int32s(&episodes, "discharge_date");
        let stay = int32s(&episodes, "length_of_stay");
        let age = int32s(&episodes, "age_at_admission");
        let method = required(&episodes, "admission_method");
        let cost = episodes
            .column_by_name("cost")
            .expect("cost")
            .as_primitive::<Float64Type>()
            .values()
            .to_vec();
        for i in 0..episodes.num_rows() {
            assert!((FIRST_DAY..=LAST_DAY).contains(&admission[i]));
            assert!(discharge[i] >= admission[i]);
            assert_eq!(stay[i], discharge[i] - admission[i]);
            let yob = birth[&person[i]];
            assert_eq!(
                age[i],
                year_of(admission[i]) - yob,
                "age from year of birth"
            );
            assert!((0..=105).contains(&age[i]));
            assert!(cost[i] > 0.0);
            assert!(
                ["11", "12", "13", "21", "22", "23", "24", "28", "31", "81"]
                    .contains(&method[i].as_str()),
                "{}",
                method[i]
            );
        }
        let per_patient = person.iter().collect::<BTreeSet<_>>();
        assert!(per_patient.len() <= counts.patients);
        total += episodes.num_rows();
        emergency += method.iter().filter(|m| m.starts_with('2')).count();
        no_procedure += strings(&episodes, "procedure_opcs4")
            .iter()
            .filter(|p| p.is_none())
            .count();
        extreme += cost.iter().filter(|&&c| c >= 100_000.0).count();
        for d in required(&episodes, "diagnosis_icd10") {
            *diagnoses.entry(d).or_default() += 1;
        }
    }
    let patients: usize = summary.trusts.iter().map(|t| t.patients).sum();
    let mean = total as f64 / patients as f64;
    assert!((2.2..2.9).contains(&mean), "episodes per patient {mean}");
    let emergency = emergency as f64 / total as f64;
    assert!(
        (0.33..0.47).contains(&emergency),
        "emergency share {emergency}"
    );
    let no_procedure = no_procedure as f64 / total as f64;
    assert!(
        (0.25..0.45).contains(&no_procedure),
        "no procedure {no_procedure}"
    );
    assert!(
        extreme > 0 && (extreme as f64) < 0.01 * total as f64,
        "{extreme} extreme costs"
    );
    let chapters = diagnoses.keys().map(|d| &d[..1]).collect::<BTreeSet<_>>();
    assert!(
        chapters.len() >= 20,
        "diagnoses span the alphabet: {chapters:?}"
    );
    assert!(diagnoses.values().any(|&n| n <= 5), "some rare codes");
}

#[test]
fn manifest_records_config_and_counts() {
    let (out, summary) = run("manifest", 500, 21);
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(out.0.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(json["config"]["patients"], 500);
    assert_eq!(json["config"]["seed"], 21);
    assert_eq!(
        json["trusts"],
        serde_json::to_value(&summary.trusts).expect("serialize")
    );
    assert_eq!(
        summary.trusts.iter().map(|t| t.patients).sum::<usize>(),
        500
    );
}

#[test]
fn invalid_sizes_are_rejected_before_writing() {
    for patients in [0, 8, 50_000_001] {
        let out = OutDir::new("invalid");
        let err = generate(&out.0, &SynthConfig { patients, seed: 1 }).expect_err("rejected");
        assert!(matches!(err, SynthError::InvalidConfig(_)), "{err}");
        assert!(!out.0.exists());
    }
}

#[test]
fn unwritable_output_is_an_io_error() {
    let out = OutDir::new("io");
    fs::write(&out.0, b"not a directory").expect("write");
    let err = generate(&out.0, &SynthConfig::default()).expect_err("cannot write under a file");
    assert!(matches!(err, SynthError::Io { .. }), "{err}");
    let _ = fs::remove_file(&out.0);
}

#[cfg(feature = "tpch")]
#[test]
fn tpch_lineitem_parts_add_up_to_the_whole_table() {
    let out = OutDir::new("tpch");
    fs::create_dir_all(&out.0).expect("mkdir");
    let scale = 0.01;
    let whole_path = out.0.join("whole.parquet");
    let whole_rows = tpch::write_lineitem(&whole_path, scale, 1, 1).expect("whole");
    let whole = read(&whole_path);
    assert_eq!(whole.num_rows(), whole_rows);
    // dbgen's row count for lineitem at SF 0.01.
    assert_eq!(whole_rows, 60_175);
    assert_eq!(
        whole
            .schema()
            .field_with_name("l_extendedprice")
            .expect("price")
            .data_type(),
        &DataType::Decimal128(15, 2)
    );
    assert_eq!(
        whole
            .schema()
            .field_with_name("l_shipdate")
            .expect("date")
            .data_type(),
        &DataType::Date32
    );

    let mut orders = BTreeSet::new();
    let mut rows = 0;
    let mut quantity = 0i128;
    for part in 1..=3 {
        let path = out.0.join(format!("part-{part}.parquet"));
        rows += tpch::write_lineitem(&path, scale, part, 3).expect("part");
        let batch = read(&path);
        let keys: BTreeSet<i64> = batch
            .column_by_name("l_orderkey")
            .expect("orderkey")
            .as_primitive::<arrow::datatypes::Int64Type>()
            .values()
            .iter()
            .copied()
            .collect();
        assert!(orders.is_disjoint(&keys), "an order is split across parts");
        orders.extend(keys);
        quantity += sum_decimal(&batch, "l_quantity");
    }
    assert_eq!(rows, whole_rows);
    assert_eq!(quantity, sum_decimal(&whole, "l_quantity"));
    let days = whole
        .column_by_name("l_shipdate")
        .expect("ship date")
        .as_primitive::<Date32Type>();
    // Ship dates fall between 1992-01-02 and 1998-12-01.
    assert!(
        days.values().iter().all(|d| (8036..=10561).contains(d)),
        "ship dates"
    );

    for (part, parts) in [(0, 3), (4, 3)] {
        let err = tpch::write_lineitem(&out.0.join("bad.parquet"), scale, part, parts)
            .expect_err("no such part");
        assert!(matches!(err, SynthError::InvalidConfig(_)), "{err}");
    }
    let err = tpch::write_lineitem(&out.0.join("bad.parquet"), 0.0, 1, 1).expect_err("no rows");
    assert!(matches!(err, SynthError::InvalidConfig(_)), "{err}");
    assert!(!out.0.join("bad.parquet").exists());
}

#[cfg(feature = "tpch")]
fn sum_decimal(batch: &RecordBatch, column: &str) -> i128 {
    batch
        .column_by_name(column)
        .expect("column")
        .as_primitive::<arrow::datatypes::Decimal128Type>()
        .values()
        .iter()
        .sum()
}
