// The Gatekeeper loss of small CPU logits as one native autograd node (lit_cascades.functional.gatekeeper).
//
// Same math as the NumPy path (_SmallGatekeeper): for logits z [N, C] with p = softmax(z), k = argmax z,
// row i is ignored when y_i == ignore_index, else correct when k == y_i; CE_i = lse - z_y and
// KL_i = sum_c p_c log p_c + log C. Forward returns
// (loss, loss_correct, loss_incorrect, error_rate) as 0-dim tensors and keeps the unweighted per-row gradients
// (p - e_y on correct rows, p * (log p - sum p log p) on incorrect rows, 0 on ignored rows); backward scales each
// row by a = (alpha g_loss + g_corr) / d_corr or b = ((1 - alpha) g_loss + g_incorr) / d_incorr.
// Bad input (a non-finite logit, a target outside [0, C) that is not ignore_index, every target ignored) raises
// ValueError without details: the caller's checked path then names what is wrong.
// Reference: Rabanser et al., "Gatekeeper: Improving Model Cascades Through Confidence Tuning", arXiv:2502.19335.
#include <torch/extension.h>

#include <cmath>
#include <stdexcept>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr uint8_t kIgnored = 0, kCorrect = 1, kIncorrect = 2;

template <typename T>
void rows_forward(const Tensor& z, const Tensor& y, int64_t ignore_index, Tensor& grad, Tensor& kind,
                  double& sum_c, double& sum_i, int64_t& n_valid, int64_t& n_inc) {
  const int64_t n = z.size(0), c = z.size(1);
  const T* zp = z.data_ptr<T>();
  const int64_t* yp = y.data_ptr<int64_t>();
  T* gp = grad.data_ptr<T>();
  uint8_t* kp = kind.data_ptr<uint8_t>();
  const double log_c = std::log(static_cast<double>(c));
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const T* zr = zp + i * c;
    T* gr = gp + i * c;
    for (int64_t j = 0; j < c; ++j) finite = finite && std::isfinite(zr[j]);  // every row, ignored ones too
    const int64_t yi = yp[i];
    if (yi == ignore_index) {
      kp[i] = kIgnored;
      for (int64_t j = 0; j < c; ++j) gr[j] = T(0);
      continue;
    }
    if (yi < 0 || yi >= c) throw std::domain_error("target out of range");  // ValueError in Python
    ++n_valid;
    int64_t k = 0;
    T m = zr[0];
    for (int64_t j = 1; j < c; ++j) {
      if (zr[j] > m) {
        m = zr[j];
        k = j;
      }
    }
    double se = 0;  // one exp per logit, kept in gr; sums in double
    for (int64_t j = 0; j < c; ++j) {
      const T e = std::exp(zr[j] - m);
      gr[j] = e;
      se += e;
    }
    const double lse = std::log(se);
    const T inv = static_cast<T>(1.0 / se), lse_t = static_cast<T>(lse);
    if (k == yi) {
      kp[i] = kCorrect;
      sum_c += lse - static_cast<double>(zr[yi] - m);
      for (int64_t j = 0; j < c; ++j) gr[j] *= inv;  // p
      gr[yi] -= T(1);
    } else {
      kp[i] = kIncorrect;
      ++n_inc;
      double plogp = 0;  // sum_c p_c log p_c
      for (int64_t j = 0; j < c; ++j) {
        gr[j] *= inv;
        plogp += static_cast<double>(gr[j]) * static_cast<double>(zr[j] - m - lse_t);
      }
      sum_i += plogp + log_c;
      const T s_t = static_cast<T>(plogp);
      for (int64_t j = 0; j < c; ++j) gr[j] *= (zr[j] - m - lse_t) - s_t;  // p (log p - sum p log p)
    }
  }
  if (!finite) throw std::domain_error("non-finite logits");
  if (n_valid == 0) throw std::domain_error("every target is ignore_index");
}

template <typename T>
void rows_backward(const Tensor& grad, const Tensor& kind, double a, double b, Tensor& out) {
  const int64_t n = grad.size(0), c = grad.size(1);
  const T* gp = grad.data_ptr<T>();
  const uint8_t* kp = kind.data_ptr<uint8_t>();
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    const T s = static_cast<T>(kp[i] == kCorrect ? a : (kp[i] == kIncorrect ? b : 0.0));
    for (int64_t j = 0; j < c; ++j) op[i * c + j] = gp[i * c + j] * s;
  }
}

struct GatekeeperFunction : public torch::autograd::Function<GatekeeperFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               int64_t ignore_index, double alpha, bool subset) {
    TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "logits must be a 2-D CPU tensor");
    TORCH_CHECK(target.scalar_type() == torch::kLong && target.dim() == 1 && target.size(0) == logits.size(0),
                "target must be an int64 [N] tensor");
    const Tensor z = logits.contiguous();
    const Tensor y = target.contiguous();
    Tensor grad = torch::empty_like(z);
    Tensor kind = torch::empty({z.size(0)}, z.options().dtype(torch::kUInt8));
    double sum_c = 0, sum_i = 0;
    int64_t n_valid = 0, n_inc = 0;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gatekeeper_forward", [&] {
      rows_forward<scalar_t>(z, y, ignore_index, grad, kind, sum_c, sum_i, n_valid, n_inc);
    });
    const double d_corr = subset ? std::max<int64_t>(n_valid - n_inc, 1) : std::max<int64_t>(n_valid, 1);
    const double d_inc = subset ? std::max<int64_t>(n_inc, 1) : std::max<int64_t>(n_valid, 1);
    const double lc = sum_c / d_corr, li = sum_i / d_inc;
    ctx->save_for_backward({grad, kind});
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
    Tensor out = torch::empty_like(saved[0]);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gatekeeper_backward", [&] {
      rows_backward<scalar_t>(saved[0], saved[1], a, b, out);
    });
    return {out, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

variable_list gatekeeper(const Tensor& logits, const Tensor& target, int64_t ignore_index, double alpha,
                         bool subset) {
  return GatekeeperFunction::apply(logits, target, ignore_index, alpha, subset);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gatekeeper", &gatekeeper, "Gatekeeper loss of [N, C] CPU logits: (loss, loss_correct, loss_incorrect, "
        "error_rate)", pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("ignore_index"),
        pybind11::arg("alpha"), pybind11::arg("subset"));
}
