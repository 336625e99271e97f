// The Gatekeeper loss of CPU logits as one native autograd node (lit_cascades.functional.gatekeeper).
//
// Same math as the NumPy path (_SmallGatekeeper) and the fused torch path (_CrossEntropyAndKL): for logits
// z [N, C] with p = softmax(z), k = argmax z (first index of the maximum), row i is ignored when
// y_i == ignore_index, else correct when k == y_i; CE_i = lse - z_y and KL_i = sum_c p_c log p_c + log C.
// Forward returns (loss, loss_correct, loss_incorrect, error_rate) as 0-dim tensors.
//
// One pass over each row, kept in cache: its maximum m, se = sum_c e^(z_c - m) and sum_c e^(z_c - m)(z_c - m),
// so lse = m + log se and sum_c p_c log p_c = pu - log se with pu = sum_c p_c (z_c - m). Nothing of size N x C is
// written forward; backward writes the gradient in one more pass over z:
//   correct rows   a (p - e_y),
//   incorrect rows b p (log p - sum p log p) = b p ((z - m) - pu),
//   ignored rows   0,
// with a = (alpha g_loss + g_corr) / d_corr and b = ((1 - alpha) g_loss + g_incorr) / d_incorr. float32 rows run
// through 8-wide vectors (GCC/Clang vector extensions) with a branch-free exp (Cody-Waite reduction and the
// Cephes degree-6 polynomial, about 1e-7 relative error); float64 rows use std::exp. Rows run in parallel
// (at::parallel_for); per-row sums are added in double.
// Bad input (no classes, a non-finite logit, a target outside [0, C) that is not ignore_index, every target
// ignored) raises ValueError without details: the caller's checked path then names what is wrong.
// Reference: Rabanser et al., "Gatekeeper: Improving Model Cascades Through Confidence Tuning", arXiv:2502.19335.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr uint8_t kIgnored = 0, kCorrect = 1, kIncorrect = 2;

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// e^x for x <= 0 (logits minus their row maximum), clamped at -87 (e^-87 ~ 1.6e-38: a probability of 0 in float).
inline v8f exp8(v8f x) {
  const v8f lo = splat(-87.f);
  x = x < lo ? lo : x;
  const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  // round(x / ln 2) for x <= 0
  const v8f nf = __builtin_convertvector(n, v8f);
  v8f r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  v8f y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const v8i bits = (n + 127) << 23;  // 2^n
  v8f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline float exp1(float x) { return exp8(splat(x))[0]; }
inline double exp1(double x) { return std::exp(x); }

inline double hsum(v8f v) {
  double s = 0;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}

struct Row {
  double m = 0, log_se = 0, pu = 0;  // maximum, log sum e^(z - m), sum p (z - m)
  int64_t k = 0;                     // argmax
};

Row row_stats(const float* z, int64_t c) {
  Row r;
  int64_t j = 0;
  v8f mv = splat(z[0]);
  for (; j + 8 <= c; j += 8) {
    const v8f v = load8(z + j);
    mv = v > mv ? v : mv;
  }
  float m = mv[0];
  for (int k = 1; k < 8; ++k) m = mv[k] > m ? mv[k] : m;
  for (; j < c; ++j) m = z[j] > m ? z[j] : m;
  while (r.k < c && !(z[r.k] == m)) ++r.k;  // first index of the maximum (c when a NaN hides it)
  v8f se = splat(0.f), su = splat(0.f);
  const v8f mm = splat(m);
  for (j = 0; j + 8 <= c; j += 8) {
    const v8f u = load8(z + j) - mm;
    const v8f e = exp8(u);
    se += e;
    su += e * u;
  }
  double se_d = hsum(se), su_d = hsum(su);
  for (; j < c; ++j) {
    const float u = z[j] - m, e = exp1(u);
    se_d += e;
    su_d += static_cast<double>(e) * u;
  }
  r.m = m;
  r.log_se = std::log(se_d);
  r.pu = su_d / se_d;
  return r;
}

Row row_stats(const double* z, int64_t c) {
  Row r;
  double m = z[0];
  for (int64_t j = 1; j < c; ++j) {
    if (z[j] > m) {
      m = z[j];
      r.k = j;
    }
  }
  double se = 0, su = 0;
  for (int64_t j = 0; j < c; ++j) {
    const double u = z[j] - m, e = std::exp(u);
    se += e;
    su += e * u;
  }
  r.m = m;
  r.log_se = std::log(se);
  r.pu = su / se;
  return r;
}

// g = e^(z - m - log_se) (c0 + c1 (z - m)); the caller subtracts a at the target of a correct row
void row_grad(const float* z, int64_t c, float m, float log_se, float c0, float c1, float* g) {
  int64_t j = 0;
  const v8f mm = splat(m), ls = splat(log_se);
  for (; j + 8 <= c; j += 8) {
    const v8f u = load8(z + j) - mm;
    store8(g + j, exp8(u - ls) * (c0 + c1 * u));
  }
  for (; j < c; ++j) {
    const float u = z[j] - m;
    g[j] = exp1(u - log_se) * (c0 + c1 * u);
  }
}

void row_grad(const double* z, int64_t c, double m, double log_se, double c0, double c1, double* g) {
  for (int64_t j = 0; j < c; ++j) {
    const double u = z[j] - m;
    g[j] = std::exp(u - log_se) * (c0 + c1 * u);
  }
}

int64_t grain(int64_t c) {  // rows per task: about 32k logits
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(c, 1));
}

struct GatekeeperFunction : public torch::autograd::Function<GatekeeperFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               int64_t ignore_index, double alpha, bool subset) {
    TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "logits must be a 2-D CPU tensor");
    TORCH_CHECK(target.scalar_type() == torch::kLong && target.dim() == 1 && target.size(0) == logits.size(0),
                "target must be an int64 [N] tensor");
    const Tensor z = logits.contiguous();
    const Tensor y = target.contiguous();
    const int64_t n = z.size(0), c = z.size(1);
    if (c == 0) throw std::domain_error("no classes");  // every row's maximum would read past its end
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (yp[i] != ignore_index && (yp[i] < 0 || yp[i] >= c)) throw std::domain_error("target out of range");
    }
    // per row: m, log se, pu (float64 whatever the dtype), kind
    Tensor stats = torch::empty({n, 3}, z.options().dtype(torch::kDouble));
    Tensor kind = torch::empty({n}, z.options().dtype(torch::kUInt8));
    double* sp = stats.data_ptr<double>();
    uint8_t* kp = kind.data_ptr<uint8_t>();
    std::vector<double> ce(n, 0.0), kl(n, 0.0);
    std::vector<uint8_t> finite(n, 1);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gatekeeper_forward", [&] {
      const scalar_t* zp = z.data_ptr<scalar_t>();
      at::parallel_for(0, n, grain(c), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* zr = zp + i * c;
          const Row r = row_stats(zr, c);
          sp[3 * i] = r.m;
          sp[3 * i + 1] = r.log_se;
          sp[3 * i + 2] = r.pu;
          finite[i] = std::isfinite(r.m) && std::isfinite(r.log_se) && std::isfinite(r.pu) && r.k < c;
          if (yp[i] == ignore_index) {
            kp[i] = kIgnored;
          } else if (r.k == yp[i]) {
            kp[i] = kCorrect;
            ce[i] = r.log_se - (static_cast<double>(zr[yp[i]]) - r.m);  // lse - z_y
          } else {
            kp[i] = kIncorrect;
            kl[i] = r.pu - r.log_se + std::log(static_cast<double>(c));  // sum p log p + log C
          }
        }
      });
    });
    double sum_c = 0, sum_i = 0;
    int64_t n_valid = 0, n_inc = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!finite[i]) throw std::domain_error("non-finite logits");
      n_valid += kp[i] != kIgnored;
      n_inc += kp[i] == kIncorrect;
      sum_c += ce[i];
      sum_i += kl[i];
    }
    if (n_valid == 0) throw std::domain_error("every target is ignore_index");
    const double d_corr = subset ? std::max<int64_t>(n_valid - n_inc, 1) : std::max<int64_t>(n_valid, 1);
    const double d_inc = subset ? std::max<int64_t>(n_inc, 1) : std::max<int64_t>(n_valid, 1);
    const double lc = sum_c / d_corr, li = sum_i / d_inc;
    ctx->save_for_backward({z, y, stats, kind});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["d_corr"] = d_corr;
    ctx->saved_data["d_inc"] = d_inc;
    ctx->set_materialize_grads(false);
    const auto opts = z.options();
    Tensor err = torch::scalar_tensor(static_cast<double>(n_inc) / std::max<int64_t>(n_valid, 1), opts);
    ctx->mark_non_differentiable({err});
    return {torch::scalar_tensor(alpha * lc + (1.0 - alpha) * li, opts), torch::scalar_tensor(lc, opts),
            torch::scalar_tensor(li, opts), err};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &y = saved[1], &stats = saved[2], &kind = saved[3];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const double d_corr = ctx->saved_data["d_corr"].toDouble();
    const double d_inc = ctx->saved_data["d_inc"].toDouble();
    auto value = [&](size_t i) -> double {  // 0-dim float/double gradients, read without a dispatch
      if (!grads[i].defined()) return 0.0;
      return grads[i].scalar_type() == torch::kDouble ? *grads[i].data_ptr<double>()
                                                       : static_cast<double>(*grads[i].data_ptr<float>());
    };
    const double g_loss = value(0), g_corr = value(1), g_inc = value(2);
    const double a = (alpha * g_loss + g_corr) / d_corr, b = ((1.0 - alpha) * g_loss + g_inc) / d_inc;
    const int64_t n = z.size(0), c = z.size(1);
    Tensor out = torch::empty_like(z);
    const int64_t* yp = y.data_ptr<int64_t>();
    const double* sp = stats.data_ptr<double>();
    const uint8_t* kp = kind.data_ptr<uint8_t>();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gatekeeper_backward", [&] {
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, grain(c), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* g = op + i * c;
          if (kp[i] == kIgnored) {
            std::fill(g, g + c, scalar_t(0));
            continue;
          }
          const double pu = sp[3 * i + 2];
          const double c0 = kp[i] == kCorrect ? a : -b * pu, c1 = kp[i] == kCorrect ? 0.0 : b;
          row_grad(zp + i * c, c, static_cast<scalar_t>(sp[3 * i]), static_cast<scalar_t>(sp[3 * i + 1]),
                   static_cast<scalar_t>(c0), static_cast<scalar_t>(c1), g);
          if (kp[i] == kCorrect) g[yp[i]] -= static_cast<scalar_t>(a);
        }
      });
    });
    return {out, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

variable_list gatekeeper(const Tensor& logits, const Tensor& target, int64_t ignore_index, double alpha,
                         bool subset) {
  return GatekeeperFunction::apply(logits, target, ignore_index, alpha, subset);
}

// exp8 elementwise over a float32 tensor of values <= 0 (exposed for its accuracy test)
Tensor exp_nonpositive(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  const Tensor xc = x.contiguous();
  Tensor out = torch::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t j = 0;
  for (; j + 8 <= xc.numel(); j += 8) store8(op + j, exp8(load8(xp + j)));
  for (; j < xc.numel(); ++j) op[j] = exp1(xp[j]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("exp_nonpositive", &exp_nonpositive, "the kernel's float32 exp of values <= 0 (for its accuracy test)");
  m.def("gatekeeper", &gatekeeper, "Gatekeeper loss of [N, C] CPU logits: (loss, loss_correct, loss_incorrect, "
        "error_rate)", pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("ignore_index"),
        pybind11::arg("alpha"), pybind11::arg("subset"));
}
