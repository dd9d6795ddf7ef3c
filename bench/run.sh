#!/usr/bin/env bash
# Benchmarks comfy-runners on this machine. Run by hand, never in CI:
#
#     bench/run.sh                                  # 1k, 100k and 1M runners (~20 min)
#     SIZES=1000 DURATION=3s RUNS=1 bench/run.sh    # a quick look
#
# For each database size: seed, import, start-up, then wrk against the list
# endpoint in five shapes at 16 and 64 connections, RUNS times each, every run
# followed by a loadcheck (is every connection answered?). Two ceilings
# serving a fixed body of the same size (examples/ceiling.rs) are measured in
# the same way: bare tiny_http, and the same HTTP layer as `serve`. Figures
# are medians of the runs, given also as ratios to the ceilings, so that the
# table shows what the database and the handlers cost rather than what this
# machine or wrk can do. Then the issue's targets, each with its figure.
# Everything goes to bench/out/; the report is bench/out/results.md.
set -euo pipefail
export LC_ALL=C # a decimal point in $EPOCHREALTIME

cd "$(dirname "$0")/.."
SIZES=${SIZES:-1000 100000 1000000}
DURATION=${DURATION:-5s}
RUNS=${RUNS:-3}
PORT=${PORT:-18189}
CEILING_PORT=${CEILING_PORT:-18190}
CONNS=(16 64)
OUT=bench/out
BIN=target/release/comfy-runners
EX=target/release/examples
# The server's own default worker count, passed to both servers so that the
# ceiling is the same machine shape.
WORKERS=$(($(nproc) * 2 > 4 ? $(nproc) * 2 : 4))
RESULTS=$OUT/results.tsv # one line per wrk run
SETUP=$OUT/setup.tsv     # one line per database size

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

# The one process of ours that may be running; killed on any exit.
live=""
trap '[ -n "$live" ] && kill "$live" 2>/dev/null; true' EXIT

if ! command -v wrk >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq wrk
fi
command -v curl >/dev/null || die "curl is needed"

cargo build --release --examples --bins
mkdir -p "$OUT"
# Anything else busy on the machine skews every figure; say so in the report.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$RESULTS"
: >"$SETUP"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Clock readings are ${EPOCHREALTIME/./}, microseconds, read without a fork.
# ms_between / s_between START END print the difference.
ms_between() { local us=$(($2 - $1)); printf '%d.%d' $((us / 1000)) $((us % 1000 / 100)); }
s_between() { local ms=$((($2 - $1) / 1000)); printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)); }

# start PORT LOG COMMAND...: runs COMMAND in the background as $live and
# waits until it answers GET /healthz; sets $startup_ms.
start() {
    local port=$1 log=$2 t0
    shift 2
    port_open "$port" && die "port $port is already in use"
    t0=${EPOCHREALTIME/./}
    "$@" 2>"$log" &
    live=$!
    # Connecting is cheap, so poll that hard; then one request proves that
    # requests are answered, not just that the socket is listening.
    until port_open "$port"; do
        kill -0 "$live" 2>/dev/null || die "$1 exited: $(cat "$log")"
        ((${EPOCHREALTIME/./} - t0 < 30000000)) || die "$1 did not start in 30 s"
    done
    curl -sf --max-time 10 -o /dev/null "http://127.0.0.1:$port/healthz" || die "no answer to /healthz"
    startup_ms=$(ms_between "$t0" "${EPOCHREALTIME/./}")
}

# stop [clean]: SIGTERM must stop the server with exit 0, so anything else
# is news (the ceiling has no handler and just dies of the signal).
stop() {
    kill -TERM "$live"
    local rc=0
    wait "$live" || rc=$?
    [ "${1:-}" != clean ] || [ "$rc" -eq 0 ] || echo "bench: pid $live exited $rc after SIGTERM" >&2
    live=""
}

# wrk output -> "req/s p50_ms p99_ms max_ms non2xx socket_errors". wrk 4
# "corrects" its percentiles for coordinated omission: one stall of T ms adds
# about T / (mean interval) synthetic samples, so one rare stall can set p99.
# Max is the one raw figure, hence kept.
parse_wrk() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /s$/) return v * 1000
            if (v ~ /m$/) return v * 60000
            return v
        }
        /^Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        $1 == "Latency" && $2 != "Distribution" { max = ms($4) }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { gsub(/,/, ""); sock = $4 + $6 + $8 + $10 }
        END { printf "%s %.3f %.3f %.3f %d %d\n", rps, p50, p99, max, non2xx, sock }'
}

# measure LABEL SCENARIO PORT PATH [WRK_ARGS...]: RUNS wrk runs at each
# connection count, each followed by a loadcheck, appended to $RESULTS as
# "label scenario conns run req/s p50 p99 max non2xx sockerr passed first_ms",
# where passed is 1 if every connection had its first answer within 1 s.
measure() {
    local label=$1 scenario=$2 port=$3 path=$4 c run out lc passed first
    shift 4
    for c in "${CONNS[@]}"; do
        # Let the pool threads of the previous connections expire, so each
        # connection count starts from what a fresh burst meets in production.
        [ "$fresh" = 1 ] || sleep 6
        fresh=0
        for run in $(seq "$RUNS"); do
            log "$label: $scenario, $c connections, run $run of $RUNS"
            out=$(wrk -t2 -c"$c" -d"$DURATION" --latency "$@" "http://127.0.0.1:$port$path")
            echo "$out" >"$OUT/wrk-$label-${scenario//[^a-z0-9=]/_}-$c-$run.txt"
            # wrk's totals would hide a connection that is never answered;
            # loadcheck counts the answers of every connection on its own
            # (and exits 1 if one got none, or its first one late).
            passed=1
            lc=$("$EX/loadcheck" "127.0.0.1:$port" "$path" "$c" 2 ${TOKEN:+"$TOKEN"} 2>&1) || passed=0
            first=$(sed -n '1s/.* first_max=\([0-9]*\)ms.*/\1/p' <<<"$lc")
            echo "   req/s p50 p99 max non2xx sockerr: $(parse_wrk <<<"$out")" >&2
            echo "   $lc" >&2
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$scenario" "$c" "$run" \
                "$(parse_wrk <<<"$out" | tr ' ' '\t')" "$passed" "${first:-0}" >>"$RESULTS"
        done
    done
}

# median_ms URL: the median time_total of 7 single requests.
median_ms() {
    for _ in 1 2 3 4 5 6 7; do
        curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" "$1"
    done | sort -n | awk 'NR == 4 { printf "%.1f", $1 * 1000 }'
}

for size in $SIZES; do
    seed=$OUT/seed-$size.json db=$OUT/bench-$size.db
    if [ -s "$seed" ]; then
        seed_s=cached
    else
        t0=${EPOCHREALTIME/./}
        "$EX/seed" "$size" "$seed"
        seed_s="$(s_between "$t0" "${EPOCHREALTIME/./}") s"
    fi
    rm -f "$db" "$db-wal" "$db-shm"
    t0=${EPOCHREALTIME/./}
    "$BIN" --db "$db" runner import --user bench "$seed" >&2
    import_s=$(s_between "$t0" "${EPOCHREALTIME/./}")
    TOKEN=$("$BIN" --db "$db" token create --user bench)
    AUTH="Authorization: Bearer $TOKEN"
    db_mb=$(du -cm "$db"* | awk 'END { print $1 }')

    start "$PORT" "$OUT/serve-$size.log" "$BIN" --db "$db" serve --listen "127.0.0.1:$PORT" --workers "$WORKERS"
    log "$size runners: imported in $import_s s, server up in $startup_ms ms"
    base=http://127.0.0.1:$PORT
    total=$(curl -sf -H "$AUTH" "$base/v1/runner?per_page=1" | sed 's/.*"total":\([0-9]*\)}$/\1/')
    [ "$total" = "$size" ] || die "the server lists $total runners, not $size"
    last=$(((total + 9) / 10))
    deep="/v1/runner?page=$last&per_page=10"
    page_bytes=$(curl -s -o /dev/null -w '%{size_download}' -H "$AUTH" "$base/v1/runner")
    page100_bytes=$(curl -s -o /dev/null -w '%{size_download}' -H "$AUTH" "$base/v1/runner?per_page=100")
    first_ms=$(median_ms "$base/v1/runner")
    deep_ms=$(median_ms "$base$deep")
    # The middle page is the deepest an offset scan goes (older pages are
    # read from the other end of the index).
    mid_ms=$(median_ms "$base/v1/runner?page=$(((last + 1) / 2))&per_page=10")

    fresh=1
    measure "$size" "default" "$PORT" "/v1/runner" -H "$AUTH"
    measure "$size" "per_page=100" "$PORT" "/v1/runner?per_page=100" -H "$AUTH"
    measure "$size" "status=active" "$PORT" "/v1/runner?status=active" -H "$AUTH"
    measure "$size" "deep page $last" "$PORT" "$deep" -H "$AUTH"
    measure "$size" "90/10 read/create" "$PORT" "/v1/runner" -H "$AUTH" -s bench/mix.lua
    rss_mb=$(awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$live/status")
    stop clean
    # Internal errors and warden trouble are logged as "comfy-runners: ...".
    log_lines=$(grep -c '^comfy-runners:' "$OUT/serve-$size.log" || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$seed_s" "$import_s" "$db_mb" "$startup_ms" \
        "$rss_mb" "$first_ms" "$deep_ms / $mid_ms" "$page_bytes" "$page100_bytes" "$log_lines" >>"$SETUP"
done

# The ceilings, sized like the last database's pages (sizes differ by a few
# bytes between databases, far below what the ratios can show), and 1.5 KB,
# the size the targets are stated against.
unset TOKEN
for bytes in 1500 "$page_bytes" "$page100_bytes"; do
    for kind in bare layer; do
        start "$CEILING_PORT" "$OUT/ceiling-$kind-$bytes.log" "$EX/ceiling" "$kind" "127.0.0.1:$CEILING_PORT" "$bytes" "$WORKERS"
        fresh=1
        measure "$kind" "$bytes" "$CEILING_PORT" "/"
        stop
    done
done

# The report. Every scenario is compared with the ceilings of its body size:
# per_page=100 with the 100-runner body, the others with the 10-runner one.
MEDIANS='
    function median(list,   v, n, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++)
            for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    # Each line of $RESULTS: per label, scenario and connection count, the
    # lists of each figure over the runs, and what the loadchecks saw.
    {
        k = $1 SUBSEP $2 SUBSEP $3
        if (!(k in runs)) order[++keys] = k
        runs[k]++
        rps[k] = rps[k] " " $5; p50[k] = p50[k] " " $6; p99[k] = p99[k] " " $7
        mx[k] = mx[k] " " $8; non2xx[k] += $9; sock[k] += $10
        good[k] += $11
        if ($12 + 0 > first[k] + 0) first[k] = $12
        next
    }
'
{
    echo "# comfy-runners benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $WORKERS workers; each figure is the median of $RUNS"
    echo "runs of wrk -t2 -d$DURATION, each run followed by a 2 s loadcheck;"
    echo "load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| runners | seed | import | db | start-up | peak RSS | 1 request: page 1 | 1 request: last / middle page | page bytes (10 / 100) | server errors logged |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' '{ printf "| %s | %s | %s s | %s MB | %s ms | %s MB | %s ms | %s ms | %s / %s | %s |\n",
        $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }' "$SETUP"
    echo
    echo "Ratios are to the ceilings of the same body size and connection count: \"bare\" is tiny_http"
    echo "alone (with TCP_NODELAY), \"layer\" is the HTTP layer of serve. req/s below 1 and latency above 1"
    echo "are what the database and handlers cost. p99 is wrk's, corrected for coordinated omission (one"
    echo "long stall weighs as many samples); max is the slowest single response. \"served\" counts the"
    echo "runs whose loadcheck had every connection answered, each first within 1 s; \"first\" is the"
    echo "slowest first answer of any connection in any of them."
    echo
    echo "| runners | scenario | conns | req/s | × bare | × layer | p50 ms | × bare | p99 ms | × bare | max ms | non-2xx | socket errors | served | first |"
    echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' -v small="$page_bytes" -v large="$page100_bytes" "$MEDIANS"'
        END {
            for (i = 1; i <= keys; i++) {
                split(order[i], f, SUBSEP)
                if (f[1] == "bare" || f[1] == "layer") continue
                b = (f[2] == "per_page=100" ? large : small) SUBSEP f[3]
                bare = "bare" SUBSEP b; layer = "layer" SUBSEP b; k = order[i]
                printf "| %s | %s | %s | %.0f | %s | %s | %.2f | %s | %.1f | %s | %.0f | %d | %d | %d/%d | %d ms |\n",
                    f[1], f[2], f[3], median(rps[k]), ratio(median(rps[k]), median(rps[bare])),
                    ratio(median(rps[k]), median(rps[layer])), median(p50[k]),
                    ratio(median(p50[k]), median(p50[bare])), median(p99[k]),
                    ratio(median(p99[k]), median(p99[bare])), median(mx[k]), non2xx[k], sock[k],
                    good[k], runs[k], first[k]
            }
        }' "$RESULTS"
    echo
    echo "| ceiling | body bytes | conns | req/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | served | first |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' "$MEDIANS"'
        END {
            for (i = 1; i <= keys; i++) {
                split(order[i], f, SUBSEP); k = order[i]
                if (f[1] != "bare" && f[1] != "layer") continue
                printf "| %s | %s | %s | %.0f | %.2f | %.1f | %.0f | %d | %d | %d/%d | %d ms |\n",
                    f[1], f[2], f[3], median(rps[k]), median(p50[k]), median(p99[k]), median(mx[k]),
                    non2xx[k], sock[k], good[k], runs[k], first[k]
            }
        }' "$RESULTS"
    echo
    # The targets, at the largest size measured (and the smallest, for the
    # ratio between them).
    echo "| target | measured | met |"
    echo "| --- | --- | --- |"
    awk -F'\t' -v large="$page100_bytes" -v setup="$SETUP" "$MEDIANS"'
        function row(what, figure, ok) { printf "| %s | %s | %s |\n", what, figure, ok ? "yes" : "**no**" }
        END {
            while ((getline line < setup) > 0) {
                split(line, s, "\t")
                if (big == "" || s[1] + 0 > big + 0) { big = s[1]; imp = s[3]; up = s[5]; rss = s[6]; split(s[8], last, " ") }
                if (small == "" || s[1] + 0 < small + 0) small = s[1]
            }
            for (c = 16; c <= 64; c *= 4) {
                d = median(rps[big SUBSEP "default" SUBSEP c])
                b = median(rps["bare" SUBSEP 1500 SUBSEP c]); l = median(rps["layer" SUBSEP 1500 SUBSEP c])
                row(sprintf("default page at %s runners, %d conns: ≥ 0.6 × the 1.5 KB ceiling", big, c),
                    sprintf("%.0f req/s = %s × bare, %s × layer", d, ratio(d, b), ratio(d, l)), d >= 0.6 * b)
                s1 = median(rps[small SUBSEP "default" SUBSEP c])
                row(sprintf("the same, ≥ 0.9 × the figure at %s runners", small),
                    sprintf("%.0f / %.0f = %s", d, s1, ratio(d, s1)), d >= 0.9 * s1)
                h = median(rps[big SUBSEP "per_page=100" SUBSEP c])
                b = median(rps["bare" SUBSEP large SUBSEP c]); l = median(rps["layer" SUBSEP large SUBSEP c])
                row(sprintf("per_page=100 at %s runners, %d conns: ≥ 0.3 × the same-size ceiling", big, c),
                    sprintf("%.0f req/s = %s × bare, %s × layer", h, ratio(h, b), ratio(h, l)), h >= 0.3 * b && h >= 0.3 * l)
            }
            p = median(p99[big SUBSEP "default" SUBSEP 16])
            row("p99 of the default page, 16 conns: < 2 ms", sprintf("%.2f ms", p), p < 2)
            row(sprintf("last page of %s runners: < 60 ms", big), last[1] " ms", last[1] + 0 < 60)
            row("peak RSS through the 64-connection runs: < 32 MB", rss " MB", rss + 0 < 32)
            row(sprintf("import of %s runners: < 15 s", big), imp " s", imp + 0 < 15)
            row("serve answering after start: < 100 ms", up " ms", up + 0 < 100)
        }' "$RESULTS"
} >"$OUT/results.md"
cat "$OUT/results.md"
