"""The third-party client figures of `tally-bench compare`: the tiny query through the
Python ADBC Flight SQL driver, as dashboards and notebooks send it.

Reads a JSON spec on stdin ({url, user, token, ca, sql, runs, clients, seconds}) and prints
one JSON line: the median and 95th percentile of `runs` sequential queries on one
connection, and the queries per second (and errors) of `clients` processes, each with its
own connection, querying for `seconds` from a common start.
"""
import json
import multiprocessing
import sys
import time


def connect(spec):
    # Imported here, not at the top: the driver starts a Go runtime when it loads, and a
    # process must not fork after that (the workers would hang), so the pool forks first.
    import adbc_driver_flightsql.dbapi as flight_sql

    with open(spec["ca"], encoding="ascii") as ca:
        kwargs = {
            "username": spec["user"],
            "password": spec["token"],
            "adbc.flight.sql.client_option.tls_root_certs": ca.read(),
        }
    return flight_sql.connect(spec["url"], db_kwargs=kwargs)


def query(cursor, sql):
    cursor.execute(sql)
    return cursor.fetch_arrow_table().num_rows


def latencies(spec):
    with connect(spec) as conn, conn.cursor() as cursor:
        for _ in range(5):
            query(cursor, spec["sql"])
        out = []
        for _ in range(spec["runs"]):
            started = time.perf_counter()
            query(cursor, spec["sql"])
            out.append((time.perf_counter() - started) * 1000.0)
    return sorted(out)


def load(args):
    spec, start, end = args
    ok = failed = 0
    with connect(spec) as conn, conn.cursor() as cursor:
        query(cursor, spec["sql"])
        while time.time() < start:
            time.sleep(0.01)
        while time.time() < end:
            try:
                query(cursor, spec["sql"])
                ok += 1
            except Exception:  # every failure counts; the figures report them
                failed += 1
    return ok, failed


def main():
    spec = json.load(sys.stdin)
    with multiprocessing.Pool(spec["clients"]) as pool:
        times = latencies(spec)
        start = time.time() + 3.0
        end = start + spec["seconds"]
        results = pool.map(load, [(spec, start, end)] * spec["clients"])
    percentile = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))]
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    print(json.dumps({
        "median_ms": percentile(0.5),
        "p95_ms": percentile(0.95),
        "runs": len(times),
        "queries_per_second": ok / spec["seconds"],
        "errors": failed,
    }))


if __name__ == "__main__":
    main()
