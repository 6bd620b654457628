// Fused CPU attention that also returns each query row's entropy (see entropic/ops/fused_cpu.py).
//
// Per (batch, head) and block of query rows, over the visible key range [0, kend):
//   forward:  S = scale Q Kᵀ (GEMM); one pass per row for the max m, e = exp(s − m), l = Σe and Σ e (s − m);
//             O = (E V) / l (GEMM); LSE = m + log l; H = log l − Σ e (s − m) / l.
//   backward: S again, P = exp(S − LSE), dP = dO Vᵀ (GEMM), δ = rowsum(dO ⊙ O), one pass
//             dS = P (dP − δ − g (S − μ)) with μ = LSE − H and g = ∂L/∂H; dV += Pᵀ dO, dQ = scale dS K,
//             dK += scale dSᵀ Q (GEMMs).
// Only O(T) per head is saved besides q, k, v and out (LSE and H). Causal attention is top-left aligned and needs
// Tq == Tk (checked by the caller). GEMMs go to the BLAS that libtorch_cpu exports (sgemm_/dgemm_); the extension
// reports through has_blas() whether it found one, and the Python side does not use it otherwise.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
// Fortran BLAS (column-major), LP64 integers. Weak: absent symbols resolve to null instead of failing the load.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace {

bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
               int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n]. A row-major matrix is its transpose
// in column-major order, so this is the column-major product Cᵀ = op(B)ᵀ op(A)ᵀ.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  blas_gemm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
            alpha, b, static_cast<int>(ldb), a, static_cast<int>(lda), beta, c, static_cast<int>(ldc));
}

// exp for x in roughly [-87, 88] (clamped outside): Cody-Waite reduction and the Cephes expf polynomial, ~1 ulp.
// Written without calls or branches so the row loops below vectorize; inputs here are s − max or s − LSE (<= ~0),
// and values below exp(-87) ≈ 1.6e-38 are returned as that instead of a denormal.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round to nearest by adding and subtracting 1.5·2²³ (std::floor would be a libm call that blocks vectorization).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline double exp_approx(double x) { return std::exp(x); }

// Pointer to row 0 of head (b, h) of a [B, H, T, D] tensor whose last dimension is contiguous.
template <typename T>
struct HeadView {
  T* data;
  int64_t sb, sh, st;
  explicit HeadView(const at::Tensor& x)
      : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  T* head(int64_t bh, int64_t heads) const { return data + (bh / heads) * sb + (bh % heads) * sh; }
};

// Query block [i0, i0 + rows) sees keys [0, key_end).
inline int64_t key_end(bool causal, int64_t i0, int64_t rows, int64_t t_k) { return causal ? i0 + rows : t_k; }
// Row i sees keys [0, visible).
inline int64_t visible(bool causal, int64_t i, int64_t t_k) { return causal ? i + 1 : t_k; }

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                                     bool causal, int64_t block) {
  const int64_t batch = q.size(0), heads = q.size(1), t_q = q.size(2), dim = q.size(3);
  const int64_t t_k = k.size(2), dim_v = v.size(3);
  const T scale = static_cast<T>(scale_d);
  auto out = at::empty({batch, heads, t_q, dim_v}, q.options());
  auto lse = at::empty({batch, heads, t_q}, q.options());
  auto ent = at::empty({batch, heads, t_q}, q.options());
  const HeadView<T> qv(q), kv(k), vv(v), ov(out);
  T* lse_p = lse.data_ptr<T>();
  T* ent_p = ent.data_ptr<T>();
  const int64_t n_blocks = (t_q + block - 1) / block;

  at::parallel_for(0, batch * heads * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(block * t_k);
    std::vector<T> inv_sum(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_blocks, i0 = (task % n_blocks) * block;
      const int64_t rows = std::min(block, t_q - i0), kend = key_end(causal, i0, rows, t_k);
      const T* q_blk = qv.head(bh, heads) + i0 * qv.st;
      const T* k_h = kv.head(bh, heads);
      T* o_blk = ov.head(bh, heads) + i0 * ov.st;
      gemm<T>(false, true, rows, kend, dim, scale, q_blk, qv.st, k_h, kv.st, T(0), s.data(), kend);
      for (int64_t r = 0; r < rows; ++r) {
        T* row = s.data() + r * kend;
        const int64_t n = visible(causal, i0 + r, t_k);
        T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
        T sum = 0, sum_es = 0;  // Σ e and Σ e (s − m), e = exp(s − m)
#pragma omp simd reduction(+ : sum, sum_es)
        for (int64_t j = 0; j < n; ++j) {
          const T x = row[j] - mx;
          const T e = exp_approx(x);
          row[j] = e;
          sum += e;
          sum_es += e * x;
        }
        std::fill(row + n, row + kend, T(0));
        const T log_sum = std::log(sum);
        inv_sum[r] = T(1) / sum;
        lse_p[bh * t_q + i0 + r] = mx + log_sum;
        ent_p[bh * t_q + i0 + r] = log_sum - sum_es / sum;
      }
      gemm<T>(false, false, rows, dim_v, kend, T(1), s.data(), kend, vv.head(bh, heads), vv.st, T(0), o_blk, ov.st);
      for (int64_t r = 0; r < rows; ++r) {
        T* o_row = o_blk + r * ov.st;
        const T c = inv_sum[r];
#pragma omp simd
        for (int64_t d = 0; d < dim_v; ++d) o_row[d] *= c;
      }
    }
  });
  return {out, lse, ent};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& ent,
                                      const at::Tensor& d_out, const at::Tensor& d_ent, double scale_d, bool causal,
                                      int64_t block) {
  const int64_t batch = q.size(0), heads = q.size(1), t_q = q.size(2), dim = q.size(3);
  const int64_t t_k = k.size(2), dim_v = v.size(3);
  const T scale = static_cast<T>(scale_d);
  auto dq = at::empty({batch, heads, t_q, dim}, q.options());
  auto dk = at::zeros({batch, heads, t_k, dim}, q.options());
  auto dv = at::zeros({batch, heads, t_k, dim_v}, q.options());
  const HeadView<T> qv(q), kv(k), vv(v), ov(out), dov(d_out), dqv(dq), dkv(dk), dvv(dv);
  const T* lse_p = lse.data_ptr<T>();
  const T* ent_p = ent.data_ptr<T>();
  const T* dent_p = d_ent.data_ptr<T>();

  // dK and dV of a head collect every query block, so one task is one (batch, head).
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(block * t_k), dp(block * t_k);
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* q_h = qv.head(bh, heads);
      const T* k_h = kv.head(bh, heads);
      const T* v_h = vv.head(bh, heads);
      const T* o_h = ov.head(bh, heads);
      const T* do_h = dov.head(bh, heads);
      T* dq_h = dqv.head(bh, heads);
      T* dk_h = dkv.head(bh, heads);
      T* dv_h = dvv.head(bh, heads);
      for (int64_t i0 = 0; i0 < t_q; i0 += block) {
        const int64_t rows = std::min(block, t_q - i0), kend = key_end(causal, i0, rows, t_k);
        const T* q_blk = q_h + i0 * qv.st;
        const T* do_blk = do_h + i0 * dov.st;
        gemm<T>(false, true, rows, kend, dim, scale, q_blk, qv.st, k_h, kv.st, T(0), s.data(), kend);
        gemm<T>(false, true, rows, kend, dim_v, T(1), do_blk, dov.st, v_h, vv.st, T(0), dp.data(), kend);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, n = visible(causal, i, t_k);
          const T* o_row = o_h + i * ov.st;
          const T* do_row = do_blk + r * dov.st;
          T delta = 0;
#pragma omp simd reduction(+ : delta)
          for (int64_t d = 0; d < dim_v; ++d) delta += do_row[d] * o_row[d];
          const T row_lse = lse_p[bh * t_q + i], mu = row_lse - ent_p[bh * t_q + i], g = dent_p[bh * t_q + i];
          T* s_row = s.data() + r * kend;
          T* dp_row = dp.data() + r * kend;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const T sj = s_row[j];
            const T p = exp_approx(sj - row_lse);
            s_row[j] = p;
            dp_row[j] = p * (dp_row[j] - delta - g * (sj - mu));
          }
          std::fill(s_row + n, s_row + kend, T(0));
          std::fill(dp_row + n, dp_row + kend, T(0));
        }
        gemm<T>(true, false, kend, dim_v, rows, T(1), s.data(), kend, do_blk, dov.st, T(1), dv_h, dvv.st);
        gemm<T>(false, false, rows, dim, kend, scale, dp.data(), kend, k_h, kv.st, T(0), dq_h + i0 * dqv.st,
                dqv.st);
        gemm<T>(true, false, kend, dim, rows, scale, dp.data(), kend, q_blk, qv.st, T(1), dk_h, dkv.st);
      }
    }
  });
  return {dq, dk, dv};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, int64_t block) {
  TORCH_CHECK(has_blas(), "fused entropic attention: libtorch_cpu exports no sgemm_/dgemm_");
  TORCH_CHECK(block >= 1, "block must be positive");
  for (const auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu() && x->dim() == 4 && x->stride(3) == 1,
                "q, k, v must be CPU [B, H, T, D] tensors with a contiguous last dimension");
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "q, k, v must share one dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "only float32 and float64");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k does not match q");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), "v does not match k");
  TORCH_CHECK(k.size(2) >= 1, "need at least one key");
  TORCH_CHECK(!causal || q.size(2) == k.size(2), "causal attention needs equal query and key lengths");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                bool causal, int64_t block) {
  check_inputs(q, k, v, causal, block);
  if (q.scalar_type() == at::kDouble) return forward_impl<double>(q, k, v, scale, causal, block);
  return forward_impl<float>(q, k, v, scale, causal, block);
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& ent, const at::Tensor& d_out,
                                 const at::Tensor& d_ent, double scale, bool causal, int64_t block) {
  check_inputs(q, k, v, causal, block);
  TORCH_CHECK(out.stride(3) == 1 && d_out.stride(3) == 1, "out and d_out need a contiguous last dimension");
  TORCH_CHECK(lse.is_contiguous() && ent.is_contiguous() && d_ent.is_contiguous(), "lse, ent, d_ent contiguous");
  for (const auto* x : {&out, &lse, &ent, &d_out, &d_ent})
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "all tensors must share q's dtype");
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(q, k, v, out, lse, ent, d_out, d_ent, scale, causal, block);
  return backward_impl<float>(q, k, v, out, lse, ent, d_out, d_ent, scale, causal, block);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_blas", &has_blas, "whether the BLAS GEMMs the kernels call were found");
  m.def("forward", &forward, "(q, k, v, scale, causal, block) -> [out, lse, entropy]");
  m.def("backward", &backward,
        "(q, k, v, out, lse, entropy, d_out, d_entropy, scale, causal, block) -> [dq, dk, dv]");
}
