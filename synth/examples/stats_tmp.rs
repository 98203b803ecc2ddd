use arrow::array::AsArray;
use arrow::datatypes::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    for t in ["RXA", "RXB", "RXC"] {
        let f = std::fs::File::open(dir.join(t).join("episodes.parquet")).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        let (mut n, mut em, mut nop, mut costs, mut los, mut spec, mut meth, mut dx) = (
            0,
            0,
            0,
            vec![],
            vec![],
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        for b in r {
            let b = b.unwrap();
            n += b.num_rows();
            for m in b
                .column_by_name("admission_method")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .flatten()
            {
                if m.starts_with('2') {
                    em += 1
                }
                *meth.entry(m.to_string()).or_insert(0) += 1;
            }
            nop += b.column_by_name("procedure_opcs4").unwrap().null_count();
            costs.extend(
                b.column_by_name("cost")
                    .unwrap()
                    .as_primitive::<Float64Type>()
                    .values()
                    .iter()
                    .copied(),
            );
            los.extend(
                b.column_by_name("length_of_stay")
                    .unwrap()
                    .as_primitive::<Int32Type>()
                    .values()
                    .iter()
                    .copied(),
            );
            for s in b
                .column_by_name("specialty")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .flatten()
            {
                *spec.entry(s.to_string()).or_insert(0) += 1;
            }
            for s in b
                .column_by_name("diagnosis_icd10")
                .unwrap()
                .as_string::<i32>()
                .iter()
                .flatten()
            {
                *dx.entry(s.to_string()).or_insert(0) += 1;
            }
        }
        costs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        los.sort();
        let q = |v: &Vec<f64>, p: f64| v[((v.len() - 1) as f64 * p) as usize];
        let ql = |p: f64| los[((los.len() - 1) as f64 * p) as usize];
        println!(
            "{t}: n={n} em={:.3} noproc={:.3} cost p5={:.0} p50={:.0} p95={:.0} p99={:.0} max={:.0} extreme={}",
            em as f64 / n as f64,
            nop as f64 / n as f64,
            q(&costs, 0.05),
            q(&costs, 0.5),
            q(&costs, 0.95),
            q(&costs, 0.99),
            costs[costs.len() - 1],
            costs.iter().filter(|&&c| c >= 100000.0).count()
        );
        println!(
            "  los p50={} p75={} p90={} p99={} max={} zero={:.3}",
            ql(0.5),
            ql(0.75),
            ql(0.9),
            ql(0.99),
            los[los.len() - 1],
            los.iter().filter(|&&l| l == 0).count() as f64 / n as f64
        );
        println!("  spec {:?}", spec);
        println!("  meth {:?}", meth);
        let mut dv: Vec<_> = dx.iter().collect();
        dv.sort_by_key(|x| std::cmp::Reverse(*x.1));
        println!("  top dx {:?}", &dv[..12]);
        println!(
            "  rare dx {:?}",
            dv.iter().filter(|x| *x.1 <= 5).collect::<Vec<_>>()
        );
    }
}
