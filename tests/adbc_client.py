"""Drives a running Tally gateway with the ADBC Flight SQL driver (a real third-party client).

Usage: python3 tests/adbc_client.py URL USER TOKEN [CA_PEM]
With CA_PEM, the gateway's TLS certificate is verified against that CA.
Prints one JSON object: the rows of a plain statement and of a prepared statement, and the
Arrow field metadata of the prepared statement's answer (each value's noise scale).
"""
import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql

PLAIN = "SELECT specialty, COUNT(*) AS n, AVG(cost) AS mean_cost FROM episodes GROUP BY specialty ORDER BY specialty"
PREPARED = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex"


def main() -> None:
    url, user, token = sys.argv[1:4]
    db_kwargs = {"username": user, "password": token}
    if len(sys.argv) > 4:
        with open(sys.argv[4], encoding="ascii") as ca:
            db_kwargs["adbc.flight.sql.client_option.tls_root_certs"] = ca.read()
    with flight_sql.connect(url, db_kwargs=db_kwargs) as conn:
        with conn.cursor() as cur:
            cur.execute(PLAIN)
            plain = [list(row) for row in cur.fetchall()]
            parameters = cur.adbc_prepare(PREPARED)
            cur.execute(PREPARED)
            table = cur.fetch_arrow_table()
            prepared = [list(row.values()) for row in table.to_pylist()]
            metadata = {
                field.name: {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
                for field in table.schema
            }
    print(json.dumps({"plain": plain, "prepared": prepared, "parameters": len(parameters),
                      "metadata": metadata}))


if __name__ == "__main__":
    main()
