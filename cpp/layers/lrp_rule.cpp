#include "layers/lrp_rule.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace fastsal::layers {

bool linear_rule(RuleKind kind) {
  switch (kind) {
    case RuleKind::kEpsilon:
    case RuleKind::kGamma:
    case RuleKind::kAlphaBeta:
    case RuleKind::kZPlus:
    case RuleKind::kZBox:
    case RuleKind::kFlat:
    case RuleKind::kWSquare:
      return true;
    default:
      return false;
  }
}

namespace {

template <typename F>
std::vector<float> map(const std::vector<float>& v, F f) {
  std::vector<float> out(v.size());
  std::transform(v.begin(), v.end(), out.begin(), f);
  return out;
}

float clamp_min0(float v) { return std::max(v, 0.f); }
float clamp_max0(float v) { return std::min(v, 0.f); }

}  // namespace

void LinearRule::prepare(const LinearOps& ops, const float* w, const float* b,
                         const std::vector<float>& scale, const std::vector<float>& shift) {
  const std::int64_t row = ops.weight_count / ops.outputs;
  w_.assign(w, w + ops.weight_count);
  const bool has_bias = b != nullptr || !shift.empty();
  if (has_bias) b_ = b ? std::vector<float>(b, b + ops.outputs) : std::vector<float>(ops.outputs, 0.f);
  if (!scale.empty()) {  // zennit's canonizer: the BatchNorm merged into the layer before it
    for (int o = 0; o < ops.outputs; ++o) {
      for (std::int64_t i = 0; i < row; ++i) w_[o * row + i] *= scale[o];
      b_[o] = b_[o] * scale[o] + shift[o];
    }
  }
  const float gamma = rule_.gamma;
  const auto bias = [&](auto f) { return has_bias ? map(b_, f) : std::vector<float>(); };
  switch (rule_.kind) {
    case RuleKind::kZPlus:
    case RuleKind::kAlphaBeta:
    case RuleKind::kZBox:
      w_plus_ = map(w_, clamp_min0), w_minus_ = map(w_, clamp_max0);
      b_plus_ = bias(clamp_min0), b_minus_ = bias(clamp_max0);
      break;
    case RuleKind::kGamma:
      w_gamma_plus_ = map(w_, [gamma](float v) { return v + gamma * std::max(v, 0.f); });
      w_gamma_minus_ = map(w_, [gamma](float v) { return v + gamma * std::min(v, 0.f); });
      b_gamma_plus_ = bias([gamma](float v) { return v + gamma * std::max(v, 0.f); });
      b_gamma_minus_ = bias([gamma](float v) { return v + gamma * std::min(v, 0.f); });
      break;
    case RuleKind::kWSquare:
      w_square_ = map(w_, [](float v) { return v * v; });
      b_square_ = bias([](float v) { return v * v; });
      break;
    case RuleKind::kFlat:
      w_ones_.assign(w_.size(), 1.f);
      break;
    default:
      break;
  }
  if (rule_.kind == RuleKind::kZBox) {
    const auto check = [&](const std::vector<float>& bound, const char* name) {
      if (bound.size() != 1 && std::int64_t(bound.size()) != ops.in_per_image)
        throw std::invalid_argument(std::string("zbox's ") + name + " has " + std::to_string(bound.size()) +
                                    " values; the layer's input has " + std::to_string(ops.in_per_image) +
                                    " per image (give one value, or one per input element)");
    };
    check(rule_.low, "low"), check(rule_.high, "high");
  }
  prepared_ = true;
}

namespace {
const float* data_or_null(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }
}  // namespace

void LinearRule::forward(const LinearOps& ops, const float* x, const float* z) {
  const auto own_output = [&](float* out) {  // W x + b: the layer's, or computed again
    if (z)
      std::copy_n(z, ops.out_count, out);
    else
      ops.forward(x, w_.data(), data_or_null(b_), out);
  };
  const std::int64_t n_in = ops.in_count, n_out = ops.out_count;
  const float eps = rule_.epsilon;
  denominator_.resize(n_out);
  s_.resize(n_out), t_.resize(n_out);
  nonnegative_ = std::all_of(x, x + n_in, [](float v) { return v >= 0.f; });
  const auto split_input = [&] {
    positive_.resize(n_in), negative_.resize(n_in);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
    for (std::int64_t i = 0; i < n_in; ++i)
      positive_[i] = std::max(x[i], 0.f), negative_[i] = std::min(x[i], 0.f);
  };
  // z = f(x+; w_pos, b_pos) + f(x-; w_neg), into out
  const auto two_sided = [&](const std::vector<float>& w_pos, const std::vector<float>& b_pos,
                             const std::vector<float>& w_neg, float* out) {
    ops.forward(nonnegative_ ? x : positive_.data(), w_pos.data(), data_or_null(b_pos), out);
    if (nonnegative_) return;
    ops.forward(negative_.data(), w_neg.data(), nullptr, t_.data());
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
    for (std::int64_t i = 0; i < n_out; ++i) out[i] += t_[i];
  };
  float* d = denominator_.data();
  switch (rule_.kind) {
    case RuleKind::kEpsilon:
      own_output(d);
      break;
    case RuleKind::kZPlus:
      if (!nonnegative_) split_input();
      two_sided(w_plus_, b_plus_, w_minus_, d);
      break;
    case RuleKind::kAlphaBeta:
      if (!nonnegative_) split_input();
      second_denominator_.resize(n_out);
      two_sided(w_plus_, b_plus_, w_minus_, d);
      two_sided(w_minus_, b_minus_, w_plus_, second_denominator_.data());
      break;
    case RuleKind::kGamma: {
      if (!nonnegative_) split_input();
      second_denominator_.resize(n_out);
      float* d2 = second_denominator_.data();
      two_sided(w_gamma_plus_, b_gamma_plus_, w_gamma_minus_, d);
      two_sided(w_gamma_minus_, b_gamma_minus_, w_gamma_plus_, d2);
      own_output(s_.data());  // the layer's own output selects the term
      // A term the output's sign switches off gets an infinite denominator: its share R / inf is 0.
      const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
      for (std::int64_t i = 0; i < n_out; ++i) {
        d[i] = s_[i] > 0.f ? stabilize(d[i], eps) : inf;
        d2[i] = s_[i] < 0.f ? stabilize(d2[i], eps) : inf;
      }
      return;
    }
    case RuleKind::kZBox: {
      const std::int64_t images = n_in / ops.in_per_image;
      low_.resize(n_in), high_.resize(n_in);
      for (std::int64_t n = 0; n < images; ++n)
        for (std::int64_t i = 0; i < ops.in_per_image; ++i) {
          low_[n * ops.in_per_image + i] = rule_.low[rule_.low.size() == 1 ? 0 : i];
          high_[n * ops.in_per_image + i] = rule_.high[rule_.high.size() == 1 ? 0 : i];
        }
      own_output(d);
      ops.forward(low_.data(), w_plus_.data(), data_or_null(b_plus_), s_.data());
      ops.forward(high_.data(), w_minus_.data(), data_or_null(b_minus_), t_.data());
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
      for (std::int64_t i = 0; i < n_out; ++i) d[i] = d[i] - (s_[i] + t_[i]);
      break;
    }
    case RuleKind::kFlat:
    case RuleKind::kWSquare:
      ones_.assign(n_in, 1.f);
      if (rule_.kind == RuleKind::kFlat)
        ops.forward(ones_.data(), w_ones_.data(), nullptr, d);
      else
        ops.forward(ones_.data(), w_square_.data(), data_or_null(b_square_), d);
      break;
    default:
      throw std::logic_error("not a linear layer's rule");
  }
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
  for (std::int64_t i = 0; i < n_out; ++i) d[i] = stabilize(d[i], eps);
  if (rule_.kind == RuleKind::kAlphaBeta)
    for (float& v : second_denominator_) v = stabilize(v, eps);
}

void LinearRule::backward(const LinearOps& ops, const float* x, const float* r_out, float* r_in) {
  const std::int64_t n_in = ops.in_count, n_out = ops.out_count;
  s_.resize(n_out), t_.resize(n_out), c_.resize(n_in), d_.resize(n_in);
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
  for (std::int64_t i = 0; i < n_out; ++i) s_[i] = r_out[i] / denominator_[i];
  if (!second_denominator_.empty() && (rule_.kind == RuleKind::kGamma || rule_.kind == RuleKind::kAlphaBeta))
#pragma omp parallel for simd schedule(static) if (n_out >= (1 << 16))
    for (std::int64_t i = 0; i < n_out; ++i) t_[i] = r_out[i] / second_denominator_[i];
  float* c = c_.data();
  float* d = d_.data();
  const float* xp = nonnegative_ ? x : positive_.data();
  const float* xn = negative_.data();
  switch (rule_.kind) {
    case RuleKind::kEpsilon:
      ops.backward_data(s_.data(), w_.data(), c);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
      for (std::int64_t i = 0; i < n_in; ++i) r_in[i] = x[i] * c[i];
      return;
    case RuleKind::kFlat:
      ops.backward_data(s_.data(), w_ones_.data(), r_in);
      return;
    case RuleKind::kWSquare:
      ops.backward_data(s_.data(), w_square_.data(), r_in);
      return;
    case RuleKind::kZBox:
      ops.backward_data(s_.data(), w_.data(), c);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
      for (std::int64_t i = 0; i < n_in; ++i) r_in[i] = x[i] * c[i];
      ops.backward_data(s_.data(), w_plus_.data(), c);
      ops.backward_data(s_.data(), w_minus_.data(), d);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
      for (std::int64_t i = 0; i < n_in; ++i) r_in[i] = r_in[i] - (low_[i] * c[i] + high_[i] * d[i]);
      return;
    default:
      break;
  }
  // Two-sided rules: R_in = x+ * (s W_a^T [+ t W_b^T]) + x- * (s W_c^T [+ t W_d^T]), with a factor per term.
  const auto term = [&](const float* signal, const std::vector<float>& w_for_pos,
                        const std::vector<float>& w_for_neg, float factor) {
    ops.backward_data(signal, w_for_pos.data(), c);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
    for (std::int64_t i = 0; i < n_in; ++i) r_in[i] += factor * (xp[i] * c[i]);
    if (nonnegative_) return;
    ops.backward_data(signal, w_for_neg.data(), c);
#pragma omp parallel for simd schedule(static) if (n_in >= (1 << 16))
    for (std::int64_t i = 0; i < n_in; ++i) r_in[i] += factor * (xn[i] * c[i]);
  };
  std::fill_n(r_in, n_in, 0.f);
  switch (rule_.kind) {
    case RuleKind::kZPlus:
      term(s_.data(), w_plus_, w_minus_, 1.f);
      return;
    case RuleKind::kAlphaBeta:
      term(s_.data(), w_plus_, w_minus_, rule_.alpha);
      term(t_.data(), w_minus_, w_plus_, -rule_.beta);
      return;
    case RuleKind::kGamma:
      term(s_.data(), w_gamma_plus_, w_gamma_minus_, 1.f);
      term(t_.data(), w_gamma_minus_, w_gamma_plus_, 1.f);
      return;
    default:
      throw std::logic_error("not a linear layer's rule");
  }
}

std::int64_t LinearRule::floats_per_image(std::int64_t in_per_image, std::int64_t out_per_image) const {
  // denominators (two), s and t, c and d, x+ and x-, zbox's bounds or the ones
  return 4 * out_per_image + 6 * in_per_image;
}

}  // namespace fastsal::layers
