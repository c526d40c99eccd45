"""Run by test_native.py in a child process (chdb opens one data path per process): store the
requests on stdin (JSON list of lists of hex payloads) through the Python encoder, through
ClickHouse's own OTLP parsing and through the C encoder (when built), print the row sets as JSON."""

import json
import sys
import tempfile

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracemesh.collector._encode import SpanColumns, encode_traces
from tracemesh.collector import _native
from tracemesh.collector._native import validate_traces
from tracemesh.collector._store import EmbeddedStore

SELECT = ("SELECT * EXCEPT (ResourceAttributeItems, SpanAttributeItems) FROM otel_traces "
          "ORDER BY ALL FORMAT JSONEachRow")


def main() -> None:
    # every case of a run goes in as one batch: one insert per path, like the writer does
    cases = [[p for case in json.load(sys.stdin) for p in case]]
    d = tempfile.mkdtemp()
    st = EmbeddedStore(d)
    st.ensure_schema()
    st.enable_native(d + "/native", min_spans=0, c_encoder=False)  # every batch native, however small
    sql_native = st.native
    c_native = None
    if _native._otlpc is not None:
        st.enable_native(d + "/native-c", c_encoder=True)
        c_native = st.native
    out = []
    for n, payloads in enumerate(cases):
        payloads = [bytes.fromhex(p) for p in payloads]
        st.execute("TRUNCATE TABLE otel_traces")
        cols, rejected, reasons = SpanColumns(), 0, []
        for p in payloads:
            r = ExportTraceServiceRequest()
            r.ParseFromString(p)
            rej = encode_traces(r, cols)[1]
            rejected += rej.count
            reasons.append(rej.reasons)
        st.insert_rows("otel_traces", cols, f"py-{n}")
        python_rows = st.query_write(SELECT, "JSONEachRow").decode().splitlines()
        st.execute("TRUNCATE TABLE otel_traces")
        batch, native_rejected = None, 0
        for p in payloads:
            r = ExportTraceServiceRequest()
            r.ParseFromString(p)
            b, rej = validate_traces(r, p)
            native_rejected += rej.count
            if batch is None:
                batch = b["otel_traces"]
            else:
                batch.extend(b["otel_traces"])
        st.native = sql_native
        if batch is not None:
            st.insert_rows("otel_traces", batch, f"native-{n}")
        native_rows = st.query_write(SELECT, "JSONEachRow").decode().splitlines()
        res = {"python": python_rows, "native": native_rows, "rejected": [rejected, native_rejected],
               "deep": sql_native.deep_spans}
        if c_native is not None:
            st.execute("TRUNCATE TABLE otel_traces")
            batch, c_rejected, c_reasons = None, 0, []
            for p in payloads:
                b, rej = _native.check_traces(p)
                c_rejected += rej.count
                c_reasons.append(rej.reasons)
                if batch is None:
                    batch = b["otel_traces"]
                else:
                    batch.extend(b["otel_traces"])
            st.native = c_native
            if batch is not None:
                st.insert_rows("otel_traces", batch, f"c-{n}")
            res["c"] = st.query_write(SELECT, "JSONEachRow").decode().splitlines()
            res["rejected"].append(c_rejected)
            res["reasons"] = [reasons, c_reasons]
        out.append(res)
    st.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
