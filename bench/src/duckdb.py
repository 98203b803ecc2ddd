# The DuckDB baseline of `tally-bench compare --duckdb`: the same queries over the same
# Parquet files, in DuckDB. Reads a JSON spec on stdin and prints one JSON line per query:
# {"median_ms", "p95_ms", "rows", "peak_rss_mib"} or {"error"}.
#
# Spec: {"runs": N, "site_tables": {"episodes": [["RXA", "path"], ...]},
#        "reference_tables": {"icd10_chapters": "path"}, "queries": ["SELECT ...", ...]}
import json
import re
import resource
import sys
import time

import duckdb

# Tally's generalising functions (common/src/generalise.rs), as DuckDB macros.
MACROS = [
    "CREATE MACRO tally_month(d) AS date_trunc('month', d)::DATE",
    "CREATE MACRO tally_age_band(a) AS CASE WHEN a < 0 THEN 'unknown' WHEN a >= 90 THEN '90+' "
    "ELSE CAST(a // 5 * 5 AS VARCHAR) || '-' || CAST(a // 5 * 5 + 4 AS VARCHAR) END",
]


def quote(path):
    return "'" + path.replace("'", "''") + "'"


def main():
    spec = json.load(sys.stdin)
    con = duckdb.connect()
    for macro in MACROS:
        con.execute(macro)
    for table, sites in spec["site_tables"].items():
        parts = [
            f"SELECT *, '{code}' AS trust_code FROM read_parquet({quote(path)})"
            for code, path in sites
        ]
        con.execute(f"CREATE VIEW {table} AS " + " UNION ALL ".join(parts))
    for table, path in spec["reference_tables"].items():
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({quote(path)})")
    for sql in spec["queries"]:
        sql = re.sub(r"\bmonth\(", "tally_month(", sql)
        sql = re.sub(r"\bage_band\(", "tally_age_band(", sql)
        try:
            rows = len(con.execute(sql).fetchall())
            times = []
            for _ in range(spec["runs"]):
                started = time.perf_counter()
                con.execute(sql).fetchall()
                times.append((time.perf_counter() - started) * 1e3)
            times.sort()
            pick = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"median_ms": pick(0.5), "p95_ms": pick(0.95), "rows": rows,
                              "peak_rss_mib": peak}), flush=True)
        except duckdb.Error as error:
            print(json.dumps({"error": str(error).splitlines()[0]}), flush=True)


main()
