fn main() {
    let args: Vec<String> = std::env::args().collect();
    let patients: usize = args[1].parse().unwrap();
    let out = std::path::PathBuf::from(&args[2]);
    let t = std::time::Instant::now();
    let s = tally_synth::generate(&out, &tally_synth::SynthConfig { patients, seed: 42 }).unwrap();
    eprintln!("{:?} in {:?}", s, t.elapsed());
}
