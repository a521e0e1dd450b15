// Runs the CUDA kernels under the CPU emulation (emu.h) against plain references written from the
// CPU backend's semantics (kernels/cpu/backend.rs, generate/sampler.rs). Build and run: run.sh.
#include "emu.h"
#include "emu_launch.h"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

extern "C" {
void gemv_f32(const float *, const float *, const float *, float *, int, int, int);
void gemv_bf16(const __nv_bfloat16 *, const float *, const float *, float *, int, int, int);
void gemv_f16(const __half *, const float *, const float *, float *, int, int, int);
void linear3_bf16(const __nv_bfloat16 *, const float *, float *, int, const __nv_bfloat16 *, const float *, float *, int,
                  const __nv_bfloat16 *, const float *, float *, int, const float *, int, int);
void rows_axpy_f32(const float *, int, const float *, const unsigned *, const unsigned *, const float *, unsigned, int,
                   float *);
void rows_axpy_bf16(const __nv_bfloat16 *, int, const float *, const unsigned *, const unsigned *, const float *, unsigned,
                    int, float *);
void rows_axpy_f16(const __half *, int, const float *, const unsigned *, const unsigned *, const float *, unsigned, int,
                   float *);
void reduce_partials(const float *, int, int, const float *, float *);
void ffn_gate_up_f32(const float *, const float *, const float *, const float *, const float *, int, const unsigned *,
                     const unsigned *, const float *, unsigned long long *, unsigned, int, int, float *);
void ffn_gate_up_bf16(const __nv_bfloat16 *, const __nv_bfloat16 *, const float *, const float *, const float *, int,
                      const unsigned *, const unsigned *, const float *, unsigned long long *, unsigned, int, int, float *);
void kv_write(const float *, const float *, float *, float *, const unsigned *, unsigned, unsigned, unsigned);
void attn_decode(const float *, const float *, const float *, const unsigned *, int, int, int, float, float, unsigned,
                 float *, float *);
void attn_combine(const float *, const float *, const unsigned *, int, unsigned, int, float *);
void attn_prefill(const float *, const float *, const float *, const unsigned *, int, int, int, int, float, float, unsigned,
                  float *);
void rms_norm(const float *, const float *, float, int, float *);
void rope(float *, const float *, const float *, const unsigned *, unsigned, unsigned, unsigned, unsigned);
void embed_bf16(const __nv_bfloat16 *, const unsigned *, unsigned, unsigned, unsigned, float, int, float *);
void observe_rows(const float *, unsigned, float *);
void observe_cols(const float *, const float *, unsigned, unsigned, unsigned, float *, float *);
void observe_reduce(const float *, unsigned, unsigned, float *);
void argmax_f32(const float *, unsigned, unsigned *);
void sample_f32(const float *, unsigned, float, unsigned, float, float, float, float *, unsigned *);
void row_sq_norms_bf16(const __nv_bfloat16 *, unsigned, unsigned, double *);
void random_fill_bf16(__nv_bfloat16 *, unsigned long long, unsigned long long, float);
void gate_act(float *, const float *, unsigned long long, int);
void sparse_act(float *, const float *, const float *, const float *, unsigned long long *, unsigned, unsigned, int);
void soft_cap(float *, float, unsigned long long);
}

static int failures = 0;
static std::mt19937_64 rng(7);

static float uni(float a = -1.f, float b = 1.f) { return std::uniform_real_distribution<float>(a, b)(rng); }
static std::vector<float> randv(size_t n, float a = -1.f, float b = 1.f) {
    std::vector<float> v(n);
    for (auto &x : v) x = uni(a, b);
    return v;
}

static void check(bool ok, const char *what, double got, double want) {
    if (!ok) {
        ++failures;
        if (failures < 40) std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    }
}

static void close(const char *what, const std::vector<float> &got, const std::vector<double> &want, double tol) {
    double scale = 1e-30;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    int bad = 0;
    for (size_t i = 0; i < want.size(); ++i)
        if (!(std::fabs(got[i] - want[i]) <= tol * std::max(1.0, scale))) {
            if (bad++ < 3) check(false, what, got[i], want[i]);
        }
    if (!bad) std::printf("ok   %s\n", what);
}

template <class T> struct W;
template <> struct W<float> {
    static float to(float v) { return v; }
    static float from(float v) { return v; }
};
template <> struct W<__nv_bfloat16> {
    static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <> struct W<__half> {
    static float to(__half v) { return __half2float(v); }
    static __half from(float v) { return __float2half_rn(v); }
};

// Device-like buffers: 256-byte aligned copies.
template <class T> struct Buf {
    T *p = nullptr;
    size_t n = 0;
    explicit Buf(size_t n_) : n(n_) { p = static_cast<T *>(std::aligned_alloc(256, ((n * sizeof(T) + 255) / 256 + 1) * 256)); std::memset(p, 0, n * sizeof(T)); }
    Buf(const std::vector<T> &v) : Buf(v.size()) { std::copy(v.begin(), v.end(), p); }
    ~Buf() { std::free(p); }
    Buf(const Buf &) = delete;
    std::vector<T> vec() const { return std::vector<T>(p, p + n); }
};

template <class T> static std::vector<T> narrow(const std::vector<float> &v) {
    std::vector<T> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = W<T>::from(v[i]);
    return r;
}
template <class T> static std::vector<float> widen(const std::vector<T> &v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = W<T>::to(v[i]);
    return r;
}

static double act_ref(int act, double x) {
    if (act == 0) return x / (1.0 + std::exp(-x));
    return 0.5 * x * (1.0 + std::tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
}

template <class T, class F> static void test_gemv(const char *name, F kernel, int rows, int cols, bool bias) {
    auto w = narrow<T>(randv((size_t)rows * cols));
    auto x = randv(cols);
    auto b = randv(rows);
    auto wf = widen(w);
    Buf<T> dw(w);
    Buf<float> dx(x), db(b), dy(rows);
    const int vec = (cols * (int)sizeof(T)) % 16 == 0;
    emu_launch({(unsigned)(rows + 7) / 8}, {256}, 0, [&] { kernel(dw.p, bias ? db.p : nullptr, dx.p, dy.p, rows, cols, vec); });
    std::vector<double> want(rows);
    for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (int c = 0; c < cols; ++c) s += (double)wf[(size_t)r * cols + c] * x[c];
        want[r] = s + (bias ? b[r] : 0.0);
    }
    char what[128];
    std::snprintf(what, sizeof what, "%s %dx%d%s", name, rows, cols, bias ? " +bias" : "");
    close(what, dy.vec(), want, 1e-5);
}

static void test_linear3() {
    const int cols = 64, r[3] = {4, 2, 3};
    std::vector<std::vector<__nv_bfloat16>> ws;
    std::vector<std::vector<float>> bs;
    for (int i = 0; i < 3; ++i) {
        ws.push_back(narrow<__nv_bfloat16>(randv((size_t)r[i] * cols)));
        bs.push_back(randv(r[i]));
    }
    auto x = randv(cols);
    Buf<__nv_bfloat16> w0(ws[0]), w1(ws[1]), w2(ws[2]);
    Buf<float> b0(bs[0]), b2(bs[2]), y0(r[0]), y1(r[1]), y2(r[2]), dx(x);
    emu_launch({(9 + 7) / 8}, {256}, 0, [&] {
        linear3_bf16(w0.p, b0.p, y0.p, r[0], w1.p, nullptr, y1.p, r[1], w2.p, b2.p, y2.p, r[2], dx.p, cols, 1);
    });
    Buf<float> *ys[3] = {&y0, &y1, &y2};
    for (int i = 0; i < 3; ++i) {
        auto wf = widen(ws[i]);
        std::vector<double> want(r[i]);
        for (int row = 0; row < r[i]; ++row) {
            double s = 0;
            for (int c = 0; c < cols; ++c) s += (double)wf[row * cols + c] * x[c];
            want[row] = s + (i == 1 ? 0.0 : bs[i][row]);
        }
        close(i == 0 ? "linear3 q" : i == 1 ? "linear3 k" : "linear3 v", ys[i]->vec(), want, 1e-5);
    }
}

// out = sum_i a[i] W[idx_i, :] through rows_axpy + reduce_partials.
template <class T, class F>
static void test_axpy(const char *name, F kernel, int n, int cols, bool sparse, int chunks, bool bias) {
    auto w = narrow<T>(randv((size_t)n * cols));
    auto wf = widen(w);
    std::vector<unsigned> idx;
    for (int j = 0; j < n; ++j)
        if (!sparse || j % 3 != 1) idx.push_back(j);
    const unsigned count = idx.size();
    idx.resize(n, 0);
    auto a = randv(n);
    auto b = randv(cols);
    Buf<T> dw(w);
    Buf<float> da(a), db(b), dpart((size_t)chunks * cols), dout(cols);
    Buf<unsigned> didx(idx), dcount(std::vector<unsigned>{count});
    const int vec = (cols * (int)sizeof(T)) % 16 == 0;
    const int per = vec ? 16 / (int)sizeof(T) : 1;
    const unsigned col_blocks = (cols + 128 * per - 1) / (128 * per);
    emu_launch({col_blocks, (unsigned)chunks}, {128}, 0, [&] {
        kernel(dw.p, cols, da.p, sparse ? didx.p : nullptr, sparse ? dcount.p : nullptr, nullptr, n, vec, dpart.p);
    });
    emu_launch({(unsigned)(cols + 31) / 32}, {32, 8}, 0, [&] { reduce_partials(dpart.p, chunks, cols, bias ? db.p : nullptr, dout.p); });
    std::vector<double> want(cols, 0.0);
    for (unsigned i = 0; i < (sparse ? count : (unsigned)n); ++i) {
        const unsigned j = sparse ? idx[i] : i;
        for (int c = 0; c < cols; ++c) want[c] += (double)a[i] * wf[(size_t)j * cols + c];
    }
    if (bias)
        for (int c = 0; c < cols; ++c) want[c] += b[c];
    char what[160];
    std::snprintf(what, sizeof what, "%s n=%d cols=%d %s chunks=%d%s", name, n, cols, sparse ? "sparse" : "dense", chunks, bias ? " +bias" : "");
    close(what, dout.vec(), want, 1e-5);
}

template <class T, class F> static void test_ffn(const char *name, F kernel, int n, int d, bool sparse, int act, bool bias) {
    auto g = narrow<T>(randv((size_t)n * d)), u = narrow<T>(randv((size_t)n * d));
    auto gf = widen(g), uf = widen(u);
    auto x = randv(d), bg = randv(n), bu = randv(n);
    std::vector<unsigned> idx;
    for (int j = 0; j < n; ++j)
        if (!sparse || j % 4 != 2) idx.push_back(j);
    const unsigned count = idx.size();
    idx.resize(n, 0);
    Buf<T> dg(g), du(u);
    Buf<float> dx(x), dbg(bg), dbu(bu), da(n);
    Buf<unsigned> didx(idx), dcount(std::vector<unsigned>{count});
    const int vec = (d * (int)sizeof(T)) % 16 == 0;
    emu_launch({(unsigned)(n + 7) / 8}, {256}, 0, [&] {
        kernel(dg.p, du.p, bias ? dbg.p : nullptr, bias ? dbu.p : nullptr, dx.p, d, sparse ? didx.p : nullptr,
               sparse ? dcount.p : nullptr, nullptr, nullptr, n, act, vec, da.p);
    });
    const unsigned m = sparse ? count : n;
    std::vector<double> want(m);
    for (unsigned i = 0; i < m; ++i) {
        const unsigned j = sparse ? idx[i] : i;
        double sg = 0, su = 0;
        for (int c = 0; c < d; ++c) {
            sg += (double)gf[(size_t)j * d + c] * x[c];
            su += (double)uf[(size_t)j * d + c] * x[c];
        }
        if (bias) {
            sg += bg[j];
            su += bu[j];
        }
        want[i] = act_ref(act, sg) * su;
    }
    auto got = da.vec();
    got.resize(m);
    char what[160];
    std::snprintf(what, sizeof what, "%s n=%d d=%d %s act=%d%s", name, n, d, sparse ? "sparse" : "dense", act, bias ? " +bias" : "");
    close(what, got, want, 1e-5);
}

// A gate threshold in the widest gap between consecutive values of the middle half of `v` (which
// holds |act| values), so that rounding cannot move a neuron across it.
static double threshold_in_gap(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t lo = v.size() / 4, hi = v.size() * 3 / 4;
    size_t best = lo;
    for (size_t k = lo; k < hi; ++k)
        if (v[k + 1] - v[k] > v[best + 1] - v[best]) best = k;
    return (v[best] + v[best + 1]) / 2;
}

// The gated decode FFN (ffn_gate_up with a threshold in device memory, then rows_axpy +
// reduce_partials), two token rows per threshold, against a plain reference: the output, a[i] == 0
// for the neurons that did not pass, and the counters (rows, passed). The down rows that must not be
// read (neurons outside the kept list, or that did not pass) are NaN, so reading one shows. t = 0
// must give the ungated kernels' result bit for bit; a threshold above every value passes none.
template <class T, class FG, class FA>
static void test_gated(const char *name, FG gate_up, FA axpy, int n, int d, bool sparse, int act, int chunks) {
    auto g = narrow<T>(randv((size_t)n * d)), u = narrow<T>(randv((size_t)n * d)), dn = narrow<T>(randv((size_t)n * d));
    auto gf = widen(g), uf = widen(u), df = widen(dn);
    auto bg = randv(n), bu = randv(n);
    const std::vector<float> xs[2] = {randv(d), randv(d)};
    std::vector<unsigned> idx;
    for (int j = 0; j < n; ++j)
        if (!sparse || j % 3 != 1) idx.push_back(j);
    const unsigned count = idx.size();
    idx.resize(n, 0);
    // Per token and candidate: act(g . x + bg) and u . x + bu.
    std::vector<double> ga[2], uv[2], mags;
    for (int t = 0; t < 2; ++t)
        for (unsigned i = 0; i < count; ++i) {
            const unsigned j = idx[i];
            double sg = bg[j], su = bu[j];
            for (int c = 0; c < d; ++c) {
                sg += (double)gf[(size_t)j * d + c] * xs[t][c];
                su += (double)uf[(size_t)j * d + c] * xs[t][c];
            }
            ga[t].push_back(act_ref(act, sg));
            uv[t].push_back(su);
            mags.push_back(std::fabs(ga[t].back()));
        }
    const double top = *std::max_element(mags.begin(), mags.end());
    const int vec = (d * (int)sizeof(T)) % 16 == 0;
    const int per = vec ? 16 / (int)sizeof(T) : 1;
    const unsigned col_blocks = (d + 128 * per - 1) / (128 * per);
    Buf<T> dg(g), du(u);
    Buf<float> dbg(bg), dbu(bu), dx0(xs[0]), dx1(xs[1]), da(n), dpart((size_t)chunks * d), dout(d);
    Buf<unsigned> didx(idx), dcount(std::vector<unsigned>{count});
    const Buf<float> *dxs[2] = {&dx0, &dx1};
    // One token through the kernels with threshold pointer `gate` (null: none) and down rows `w`.
    auto run = [&](int t, const float *gate, unsigned long long *counters, const Buf<T> &w) {
        emu_launch({(unsigned)(n + 7) / 8}, {256}, 0, [&] {
            gate_up(dg.p, du.p, dbg.p, dbu.p, dxs[t]->p, d, sparse ? didx.p : nullptr, sparse ? dcount.p : nullptr, gate,
                    counters, n, act, vec, da.p);
        });
        emu_launch({col_blocks, (unsigned)chunks}, {128}, 0, [&] {
            axpy(w.p, d, da.p, sparse ? didx.p : nullptr, sparse ? dcount.p : nullptr, gate, n, vec, dpart.p);
        });
        emu_launch({(unsigned)(d + 31) / 32}, {32, 8}, 0, [&] { reduce_partials(dpart.p, chunks, d, nullptr, dout.p); });
    };
    Buf<T> dw(dn);
    run(0, nullptr, nullptr, dw);
    const auto ungated_a = da.vec(), ungated_out = dout.vec();
    for (double t : {0.0, threshold_in_gap(mags), 2 * top}) {
        const float tf = (float)t;
        Buf<float> dgate(std::vector<float>{tf});
        Buf<unsigned long long> counters(2);
        unsigned long long passed = 0;
        std::vector<float> got;
        std::vector<double> want;
        for (int k = 0; k < 2; ++k) {
            // The down rows this token must not read, as NaN.
            auto poisoned = dn;
            std::vector<bool> read(n, false);
            for (unsigned i = 0; i < count; ++i) read[idx[i]] = std::fabs(ga[k][i]) >= t;
            for (int j = 0; j < n; ++j)
                if (!read[j])
                    for (int c = 0; c < d; ++c) poisoned[(size_t)j * d + c] = W<T>::from(NAN);
            Buf<T> dpw(poisoned);
            run(k, dgate.p, counters.p, dpw);
            const auto a = da.vec(), out = dout.vec();
            std::vector<double> ref(d, 0.0);
            for (unsigned i = 0; i < count; ++i) {
                const bool pass = std::fabs(ga[k][i]) >= t;
                passed += pass;
                if (!pass) {
                    check(a[i] == 0.f, "a[i] of a neuron that did not pass", a[i], 0);
                    continue;
                }
                for (int c = 0; c < d; ++c) ref[c] += ga[k][i] * uv[k][i] * df[(size_t)idx[i] * d + c];
            }
            if (k == 0 && tf == 0.f) {
                // No gate: the ungated kernels' bits.
                const bool same = std::memcmp(a.data(), ungated_a.data(), 4 * count) == 0 &&
                                  std::memcmp(out.data(), ungated_out.data(), 4 * d) == 0;
                check(same, "t = 0 gives the ungated bits", 0, 1);
            }
            got.insert(got.end(), out.begin(), out.end());
            want.insert(want.end(), ref.begin(), ref.end());
        }
        // Counters only for a gate: two rows, and the passing neurons of both.
        const unsigned long long want_rows = tf > 0.f ? 2 : 0, want_passed = tf > 0.f ? passed : 0;
        check(counters.p[0] == want_rows, "gated rows counter", counters.p[0], want_rows);
        check(counters.p[1] == want_passed, "gated passed counter", counters.p[1], want_passed);
        if (t > top) check(passed == 0, "a threshold above every value passes none", passed, 0);
        char what[200];
        std::snprintf(what, sizeof what, "%s n=%d d=%d %s act=%d chunks=%d t=%g: %llu of %u passed", name, n, d,
                      sparse ? "sparse" : "dense", act, chunks, t, passed, 2 * count);
        close(what, got, want, 1e-5);
    }
}

// sparse_act over rows of n values: the per-row gate and the keep row (gated), or act * u * keep,
// against the CPU backend's formulas (float), with the counters.
static void test_sparse_act(unsigned rows, unsigned n, int act, bool gated) {
    auto a = randv((size_t)rows * n, -4, 4), u = randv((size_t)rows * n);
    std::vector<float> keep(n);
    for (unsigned j = 0; j < n; ++j) keep[j] = j % 3 != 1;
    std::vector<double> mags;
    for (float v : a) mags.push_back(std::fabs(act_ref(act, v)));
    const float t = gated ? (float)threshold_in_gap(mags) : 0.f;
    Buf<float> da(a), du(u), dkeep(keep), dgate(std::vector<float>{t});
    Buf<unsigned long long> counters(2);
    emu_launch({3}, {256}, 0, [&] { sparse_act(da.p, du.p, dkeep.p, dgate.p, counters.p, rows, n, act); });
    std::vector<double> want(a.size());
    unsigned long long passed = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double g = act_ref(act, a[i]);
        const bool pass = keep[i % n] != 0.f && std::fabs(g) >= t;
        passed += gated && pass;
        want[i] = gated ? (pass ? g * u[i] : 0.0) : g * u[i] * keep[i % n];
    }
    char what[120];
    std::snprintf(what, sizeof what, "sparse_act rows=%u n=%u act=%d t=%g (%llu passed)", rows, n, act, t, passed);
    int bad = failures;
    check(counters.p[0] == (gated ? rows : 0), "sparse_act rows counter", counters.p[0], gated ? rows : 0);
    check(counters.p[1] == passed, "sparse_act passed counter", counters.p[1], passed);
    if (failures == bad) close(what, da.vec(), want, 1e-6);
}

// Reference attention of query rows at positions start + i (the CPU backend's loop, in double).
static std::vector<double> attn_ref(const std::vector<float> &q, const std::vector<float> &kc, const std::vector<float> &vc,
                                    int rows, unsigned start, int heads, int kvh, int hd, float scale, float cap, unsigned window) {
    const int qd = heads * hd, kvd = kvh * hd, group = heads / kvh;
    std::vector<double> out((size_t)rows * qd, 0.0);
    for (int i = 0; i < rows; ++i)
        for (int h = 0; h < heads; ++h) {
            const unsigned p = start + i;
            const unsigned lo = window && p + 1 > window ? p + 1 - window : 0;
            std::vector<double> s;
            for (unsigned j = lo; j <= p; ++j) {
                double d = 0;
                for (int c = 0; c < hd; ++c) d += (double)q[(size_t)i * qd + h * hd + c] * kc[(size_t)j * kvd + (h / group) * hd + c];
                d *= scale;
                if (cap > 0) d = std::tanh(d / cap) * cap;
                s.push_back(d);
            }
            const double m = *std::max_element(s.begin(), s.end());
            double l = 0;
            for (auto &x : s) l += (x = std::exp(x - m));
            for (unsigned j = lo; j <= p; ++j)
                for (int c = 0; c < hd; ++c)
                    out[(size_t)i * qd + h * hd + c] += s[j - lo] / l * vc[(size_t)j * kvd + (h / group) * hd + c];
        }
    return out;
}

static void test_attention(int rows, unsigned start, int heads, int kvh, int hd, unsigned capacity, float cap, unsigned window) {
    const int qd = heads * hd, kvd = kvh * hd;
    auto kc = randv((size_t)capacity * kvd), vc = randv((size_t)capacity * kvd);
    auto q = randv((size_t)rows * qd), k = randv((size_t)rows * kvd), v = randv((size_t)rows * kvd);
    const float scale = 1.0f / std::sqrt((float)hd);
    Buf<float> dkc(kc), dvc(vc), dq(q), dk(k), dv(v), dctx((size_t)rows * qd);
    Buf<unsigned> dstart(std::vector<unsigned>{start});
    emu_launch({4}, {256}, 0, [&] { kv_write(dk.p, dv.p, dkc.p, dvc.p, dstart.p, rows, kvd, capacity); });
    for (int i = 0; i < rows; ++i)
        for (int c = 0; c < kvd; ++c) {
            kc[(size_t)(start + i) * kvd + c] = k[(size_t)i * kvd + c];
            vc[(size_t)(start + i) * kvd + c] = v[(size_t)i * kvd + c];
        }
    auto want = attn_ref(q, kc, vc, rows, start, heads, kvh, hd, scale, cap, window);
    char what[200];
    if (rows == 1) {
        const int group = heads / kvh, splits = (capacity + 255) / 256;
        const size_t smem = 4 * (group * hd + group * 256 + 8 * 256 + 2 * group);
        Buf<float> po((size_t)heads * splits * hd), pml((size_t)heads * splits * 2);
        emu_launch({(unsigned)kvh, (unsigned)splits}, {256}, smem, [&] {
            attn_decode(dq.p, dkc.p, dvc.p, dstart.p, heads, kvh, hd, scale, cap, window, po.p, pml.p);
        });
        emu_launch({(unsigned)heads}, {128}, 0, [&] { attn_combine(po.p, pml.p, dstart.p, hd, window, splits, dctx.p); });
        std::snprintf(what, sizeof what, "attn decode p=%u heads=%d/%d hd=%d cap=%g window=%u splits=%d", start, heads, kvh, hd, cap, window, splits);
    } else {
        const size_t smem = 4 * (32 * hd + 32 * (hd + 4) + 32 * hd);
        emu_launch({(unsigned)(rows + 31) / 32, (unsigned)heads}, {256}, smem, [&] {
            attn_prefill(dq.p, dkc.p, dvc.p, dstart.p, rows, heads, kvh, hd, scale, cap, window, dctx.p);
        });
        std::snprintf(what, sizeof what, "attn prefill rows=%d start=%u heads=%d/%d hd=%d cap=%g window=%u", rows, start, heads, kvh, hd, cap, window);
    }
    close(what, dctx.vec(), want, 2e-5);
    // The cache holds the step's keys and values.
    auto gk = dkc.vec();
    bool ok = true;
    for (size_t i = 0; i < kc.size(); ++i) ok &= gk[i] == kc[i];
    check(ok, "kv_write", 0, 0);
}

static void test_rms(int rows, int dim, bool inplace) {
    auto x = randv((size_t)rows * dim), g = randv(dim, 0.5f, 1.5f);
    Buf<float> dx(x), dg(g), dout((size_t)rows * dim);
    unsigned threads = 32;
    while (threads < 1024 && threads < (unsigned)(dim + 3) / 4) threads *= 2;
    emu_launch({(unsigned)rows}, {threads}, 0, [&] { rms_norm(dx.p, dg.p, 1e-6f, dim, inplace ? dx.p : dout.p); });
    std::vector<double> want((size_t)rows * dim);
    for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (int c = 0; c < dim; ++c) s += (double)x[r * dim + c] * x[r * dim + c];
        const double inv = 1.0 / std::sqrt(s / dim + 1e-6);
        for (int c = 0; c < dim; ++c) want[r * dim + c] = x[r * dim + c] * inv * g[c];
    }
    char what[80];
    std::snprintf(what, sizeof what, "rms_norm %dx%d%s", rows, dim, inplace ? " in place" : "");
    close(what, inplace ? dx.vec() : dout.vec(), want, 1e-5);
}

static void test_rope() {
    const int rows = 3, hd = 8, heads = 2, width = hd * heads, half = hd / 2, positions = 10;
    const unsigned start = 2;
    auto x = randv(rows * width), cs = randv(positions * half), sn = randv(positions * half);
    Buf<float> dx(x), dc(cs), ds(sn);
    Buf<unsigned> dstart(std::vector<unsigned>{start});
    emu_launch({1}, {256}, 0, [&] { rope(dx.p, dc.p, ds.p, dstart.p, rows, width, half, positions); });
    std::vector<double> want(x.begin(), x.end());
    for (int i = 0; i < rows; ++i)
        for (int h = 0; h < heads; ++h)
            for (int j = 0; j < half; ++j) {
                const int p = start + i, b = i * width + h * hd;
                const double x1 = x[b + j], x2 = x[b + j + half], c = cs[p * half + j], s = sn[p * half + j];
                want[b + j] = x1 * c - x2 * s;
                want[b + j + half] = x2 * c + x1 * s;
            }
    close("rope", dx.vec(), want, 1e-6);
}

static void test_embed() {
    const unsigned vocab = 11, cols = 24, rows = 3;
    auto t = narrow<__nv_bfloat16>(randv(vocab * cols));
    std::vector<unsigned> toks = {4, 0, 10};
    Buf<__nv_bfloat16> dt(t);
    Buf<unsigned> dtok(toks);
    Buf<float> dx(rows * cols);
    emu_launch({1}, {256}, 0, [&] { embed_bf16(dt.p, dtok.p, rows, cols, vocab, 2.5f, 1, dx.p); });
    std::vector<double> want(rows * cols);
    for (unsigned i = 0; i < rows; ++i)
        for (unsigned c = 0; c < cols; ++c) want[i * cols + c] = (double)W<__nv_bfloat16>::to(t[toks[i] * cols + c]) * 2.5;
    close("embed bf16 * scale", dx.vec(), want, 1e-7);
}

static void test_observe(unsigned rows, unsigned n) {
    auto a = randv((size_t)rows * n);
    for (unsigned j = 0; j < n; ++j) a[(size_t)1 * n + j] = 0.f;  // a zero row
    const unsigned off = 5, rpc = 64, chunks = (rows + rpc - 1) / rpc;
    auto acc = randv(off + 2 * n + 3);
    Buf<float> da(a), dacc(acc), dinv(rows), dpart((size_t)chunks * 2 * n);
    emu_launch({rows}, {256}, 0, [&] { observe_rows(da.p, n, dinv.p); });
    emu_launch({(n + 255) / 256, chunks}, {256}, 0, [&] {
        observe_cols(da.p, dinv.p, rows, n, rpc, dacc.p + off, chunks > 1 ? dpart.p : nullptr);
    });
    if (chunks > 1) emu_launch({(2 * n + 255) / 256}, {256}, 0, [&] { observe_reduce(dpart.p, chunks, 2 * n, dacc.p + off); });
    std::vector<double> want(acc.begin(), acc.end());
    for (unsigned t = 0; t < rows; ++t) {
        double n2 = 0;
        for (unsigned j = 0; j < n; ++j) n2 += (double)a[t * n + j] * a[t * n + j];
        const double inv = n2 > 0 ? 1.0 / n2 : 0.0;
        for (unsigned j = 0; j < n; ++j) {
            const double v2 = (double)a[t * n + j] * a[t * n + j];
            want[off + j] += v2;
            want[off + n + j] += v2 * inv;
        }
    }
    char what[80];
    std::snprintf(what, sizeof what, "observe rows=%u n=%u chunks=%u", rows, n, chunks);
    close(what, dacc.vec(), want, 1e-5);
}

static void test_argmax() {
    std::vector<float> x = randv(5000);
    x[77] = 3.0f;
    x[4000] = 3.0f;
    x[12] = -INFINITY;
    Buf<float> dx(x);
    Buf<unsigned> out(1);
    emu_launch({1}, {1024}, 0, [&] { argmax_f32(dx.p, x.size(), out.p); });
    check(out.p[0] == 77, "argmax first of ties", out.p[0], 77);
    std::vector<float> m(40, -INFINITY);
    Buf<float> dm(m);
    emu_launch({1}, {1024}, 0, [&] { argmax_f32(dm.p, m.size(), out.p); });
    check(out.p[0] == 0, "argmax all -inf", out.p[0], 0);
    if (out.p[0] == 0) std::printf("ok   argmax\n");
}

// The CPU sampler's kept set (sorted by probability, descending; stable on index for ties), then
// the draw the device makes: the first index, in index order, where the kept mass passes u * mass.
static int sample_ref(const std::vector<float> &x, float temp, unsigned top_k, float top_p, float min_p, float u) {
    const float inv_t = 1.0f / temp;
    std::vector<std::pair<float, unsigned>> c;
    for (unsigned i = 0; i < x.size(); ++i) c.push_back({x[i] * inv_t, i});
    auto desc = [](const auto &a, const auto &b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    std::sort(c.begin(), c.end(), desc);
    if (top_k > 0 && top_k < c.size()) c.resize(top_k);
    const float mx = c[0].first;
    double total = 0;
    for (auto &e : c) total += (double)(e.first = std::exp(e.first - mx));
    for (auto &e : c) e.first = (float)((double)e.first / total);
    if (top_p < 1.0f) {
        double cum = 0;
        size_t keep = c.size();
        for (size_t i = 0; i < c.size(); ++i) {
            cum += c[i].first;
            if (cum >= top_p) {
                keep = i + 1;
                break;
            }
        }
        c.resize(keep);
    }
    if (min_p > 0) {
        const float floor = min_p * c[0].first;
        size_t keep = 0;
        while (keep < c.size() && c[keep].first >= floor) ++keep;
        c.resize(std::max<size_t>(keep, 1));
    }
    std::sort(c.begin(), c.end(), [](const auto &a, const auto &b) { return a.second < b.second; });
    double mass = 0;
    for (auto &e : c) mass += e.first;
    const double r = u * mass;
    double cum = 0;
    for (auto &e : c) {
        cum += e.first;
        if (r < cum) return e.second;
    }
    return c.back().second;
}

static void test_sample() {
    struct Case {
        unsigned len;
        float temp;
        unsigned k;
        float p, minp;
        bool ties;
    } cases[] = {
        {3000, 1.0f, 0, 1.0f, 0.0f, false}, {3000, 0.7f, 50, 0.9f, 0.0f, false}, {3000, 1.3f, 0, 0.9f, 0.0f, false},
        {3000, 1.0f, 10, 1.0f, 0.1f, false}, {3000, 1.0f, 1, 1.0f, 0.0f, false},  {5000, 0.5f, 40, 0.95f, 0.05f, true},
        {100, 2.0f, 0, 0.5f, 0.0f, false},   {7, 1.0f, 3, 1.0f, 0.0f, true},      {3000, 1.0f, 0, 0.0f, 0.0f, false},
        {3000, 0.3f, 0, 1.0f, 0.5f, false},  {3000, 0.25f, 100, 1.0f, 0.2f, false}, {3000, 1.0f, 5, 0.6f, 0.0f, true},
        {3000, 1.0f, 0, 0.3f, 0.0f, true},   {3000, 0.5f, 0, 0.999f, 0.01f, false},
    };
    int bad = 0, total = 0;
    for (const auto &cs : cases) {
        auto x = randv(cs.len, -4.f, 4.f);
        if (cs.ties) {
            for (unsigned i = 0; i < cs.len; i += 3) x[i] = 2.0f;  // many equal logits
            for (unsigned i = 5; i < cs.len; i += cs.len / 7 + 1) x[i] = 4.5f;  // equal logits at the top
        }
        Buf<float> dx(x), work(cs.len);
        Buf<unsigned> out(1);
        for (float u : {0.0f, 0.1f, 0.37f, 0.5f, 0.73f, 0.999f}) {
            emu_launch({1}, {1024}, 0, [&] { sample_f32(dx.p, cs.len, 1.0f / cs.temp, cs.k, cs.p, cs.minp, u, work.p, out.p); });
            const int want = sample_ref(x, cs.temp, cs.k, cs.p, cs.minp, u);
            ++total;
            if ((int)out.p[0] != want) {
                ++bad;
                std::printf("FAIL sample len=%u t=%g k=%u p=%g minp=%g ties=%d u=%g: got %u want %d\n", cs.len, cs.temp, cs.k, cs.p, cs.minp, cs.ties, u, out.p[0], want);
            }
        }
    }
    failures += bad;
    if (!bad) std::printf("ok   sample (%d draws)\n", total);
}

static void test_weights() {
    const unsigned rows = 13, cols = 37;
    auto w = narrow<__nv_bfloat16>(randv(rows * cols));
    Buf<__nv_bfloat16> dw(w);
    Buf<double> out(rows);
    emu_launch({(rows + 7) / 8}, {256}, 0, [&] { row_sq_norms_bf16(dw.p, rows, cols, out.p); });
    std::vector<double> want(rows, 0.0);
    std::vector<float> got(rows);
    for (unsigned r = 0; r < rows; ++r) {
        for (unsigned c = 0; c < cols; ++c) want[r] += std::pow((double)W<__nv_bfloat16>::to(w[r * cols + c]), 2);
        got[r] = (float)out.p[r];
    }
    close("row_sq_norms bf16", got, want, 1e-6);
    Buf<__nv_bfloat16> r(10000);
    emu_launch({8}, {256}, 0, [&] { random_fill_bf16(r.p, 10000, 42, 0.5f); });
    double lo = 1, hi = -1, mean = 0;
    for (size_t i = 0; i < 10000; ++i) {
        const double v = W<__nv_bfloat16>::to(r.p[i]);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        mean += v / 10000;
    }
    const bool ok = lo >= -0.5 && hi <= 0.5 && lo < -0.45 && hi > 0.45 && std::fabs(mean) < 0.02;
    check(ok, "random_fill range", lo, hi);
    if (ok) std::printf("ok   random_fill [%g, %g] mean %g\n", lo, hi, mean);
}

static void test_elementwise() {
    auto a = randv(1000, -6, 6), u = randv(1000);
    for (int act = 0; act < 2; ++act) {
        Buf<float> da(a), du(u);
        emu_launch({4}, {256}, 0, [&] { gate_act(da.p, du.p, 1000, act); });
        std::vector<double> want(1000);
        for (int i = 0; i < 1000; ++i) want[i] = act_ref(act, a[i]) * u[i];
        close(act ? "gate_act gelu" : "gate_act silu", da.vec(), want, 1e-6);
    }
    Buf<float> dx(a);
    emu_launch({2}, {256}, 0, [&] { soft_cap(dx.p, 3.0f, 1000); });
    std::vector<double> want(1000);
    for (int i = 0; i < 1000; ++i) want[i] = std::tanh(a[i] / 3.0) * 3.0;
    close("soft_cap", dx.vec(), want, 1e-6);
}

int main() {
    for (bool bias : {false, true}) {
        test_gemv<float>("gemv f32", gemv_f32, 5, 64, bias);
        test_gemv<__nv_bfloat16>("gemv bf16", gemv_bf16, 9, 2048, bias);
        test_gemv<__half>("gemv f16", gemv_f16, 17, 520, bias);
    }
    test_gemv<float>("gemv f32", gemv_f32, 3, 7, true);
    test_gemv<__nv_bfloat16>("gemv bf16", gemv_bf16, 6, 99, false);
    test_gemv<__half>("gemv f16", gemv_f16, 4, 1030, true);
    test_linear3();
    test_axpy<__nv_bfloat16>("rows_axpy bf16", rows_axpy_bf16, 37, 64, true, 5, false);
    test_axpy<__nv_bfloat16>("rows_axpy bf16", rows_axpy_bf16, 37, 2048, false, 3, true);
    test_axpy<float>("rows_axpy f32", rows_axpy_f32, 50, 36, true, 7, true);
    test_axpy<__half>("rows_axpy f16", rows_axpy_f16, 21, 13, false, 4, false);
    test_axpy<__half>("rows_axpy f16", rows_axpy_f16, 3, 16, true, 8, false);
    test_ffn<__nv_bfloat16>("ffn bf16", ffn_gate_up_bf16, 37, 64, true, 0, false);
    test_ffn<__nv_bfloat16>("ffn bf16", ffn_gate_up_bf16, 21, 1024, false, 1, true);
    test_ffn<float>("ffn f32", ffn_gate_up_f32, 19, 7, true, 1, true);
    test_ffn<float>("ffn f32", ffn_gate_up_f32, 19, 132, false, 0, false);
    test_gated<float>("gated ffn f32", ffn_gate_up_f32, rows_axpy_f32, 45, 64, true, 0, 3);
    test_gated<float>("gated ffn f32", ffn_gate_up_f32, rows_axpy_f32, 40, 7, false, 1, 4);
    test_gated<__nv_bfloat16>("gated ffn bf16", ffn_gate_up_bf16, rows_axpy_bf16, 61, 128, false, 0, 5);
    test_gated<__nv_bfloat16>("gated ffn bf16", ffn_gate_up_bf16, rows_axpy_bf16, 37, 1024, true, 1, 2);
    test_sparse_act(5, 37, 0, true);
    test_sparse_act(9, 130, 1, true);
    test_sparse_act(5, 37, 0, false);
    test_attention(1, 300, 4, 2, 16, 600, 0.0f, 0);
    test_attention(1, 300, 4, 2, 16, 600, 5.0f, 100);
    test_attention(1, 0, 2, 2, 12, 40, 0.0f, 0);
    test_attention(1, 513, 12, 1, 32, 700, 0.0f, 0);
    test_attention(1, 70, 3, 3, 6, 80, 0.0f, 8);
    test_attention(1, 255, 2, 1, 64, 512, 0.0f, 0);
    test_attention(40, 5, 4, 2, 16, 64, 0.0f, 0);
    test_attention(40, 5, 4, 2, 20, 64, 4.0f, 7);
    test_attention(3, 0, 2, 1, 6, 8, 0.0f, 0);
    test_attention(70, 30, 2, 2, 64, 128, 0.0f, 33);
    test_rms(3, 64, false);
    test_rms(2, 1000, true);
    test_rms(1, 4096, false);
    test_rope();
    test_embed();
    test_observe(5, 37);
    test_observe(130, 300);
    test_argmax();
    test_sample();
    test_weights();
    test_elementwise();
    std::printf(failures ? "\n%d FAILURES\n" : "\nall ok\n", failures);
    return failures != 0;
}
