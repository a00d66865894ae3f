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
std::shared_ptr<const std::vector<float>> map(const std::vector<float>& v, F f) {
  auto out = std::make_shared<std::vector<float>>(v.size());
  std::transform(v.begin(), v.end(), out->begin(), f);
  return out;
}

float clamp_min0(float v) { return std::max(v, 0.f); }
float clamp_max0(float v) { return std::min(v, 0.f); }

// An element-wise pass over the cores (large arrays only).
template <typename F>
void each(std::int64_t count, F body) {
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) body(i);
}

float* sized(std::vector<float>& buffer, std::int64_t count) {
  if (std::int64_t(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace

void LinearRule::prepare(const LinearOps& ops, const float* w, const float* b,
                         const std::vector<float>& scale, const std::vector<float>& shift) {
  const std::int64_t row = ops.weight_count / ops.outputs;
  products_.clear(), per_image_.clear();  // laid out from the previous weights (reload_weights)
  auto weights = std::make_shared<std::vector<float>>(w, w + ops.weight_count);
  weight_count_ = ops.weight_count;
  const bool has_bias = b != nullptr || !shift.empty();
  if (has_bias) b_ = b ? std::vector<float>(b, b + ops.outputs) : std::vector<float>(ops.outputs, 0.f);
  if (!scale.empty()) {  // zennit's canonizer: the BatchNorm merged into the layer before it
    for (int o = 0; o < ops.outputs; ++o) {
      for (std::int64_t i = 0; i < row; ++i) (*weights)[o * row + i] *= scale[o];
      b_[o] = b_[o] * scale[o] + shift[o];
    }
  }
  w_ = std::move(weights);
  if (rule_.kind == RuleKind::kZBox) {
    const auto check = [&](const std::vector<float>& bound, const char* name) {
      if (bound.size() != 1 && std::int64_t(bound.size()) != ops.in_per_image)
        throw std::invalid_argument(std::string("zbox's ") + name + " has " + std::to_string(bound.size()) +
                                    " values; the layer's input has " + std::to_string(ops.in_per_image) +
                                    " per image (give one value, or one per input element)");
    };
    check(rule_.low, "low"), check(rule_.high, "high");
    low_.resize(ops.in_per_image), high_.resize(ops.in_per_image);
    for (std::int64_t i = 0; i < ops.in_per_image; ++i) {
      low_[i] = rule_.low[rule_.low.size() == 1 ? 0 : i];
      high_[i] = rule_.high[rule_.high.size() == 1 ? 0 : i];
    }
  }
  prepared_ = true;
}

WeightStack LinearRule::weights(Stack stack) const {
  const float gamma = rule_.gamma;
  const auto plus = [&] { return map(*w_, clamp_min0); };
  const auto minus = [&] { return map(*w_, clamp_max0); };
  const auto bias = [&](auto f) {
    std::vector<float> out(b_.size());
    std::transform(b_.begin(), b_.end(), out.begin(), f);
    return out;
  };
  const auto join = [](std::vector<float> a, const std::vector<float>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  WeightStack s;
  switch (stack) {
    case Stack::kOwn:
      s.blocks = {w_}, s.bias = b_;
      break;
    case Stack::kPlus:
      s.blocks = {plus()}, s.bias = bias(clamp_min0);
      break;
    case Stack::kPlusMixed:  // x+ W+ + x- W- (+ b+)
      s.in_blocks = 2, s.blocks = {plus(), minus()}, s.bias = bias(clamp_min0);
      break;
    case Stack::kAlphaBeta:  // [x W+ + b+; x W- + b-]
      s.out_blocks = 2, s.blocks = {plus(), minus()};
      s.bias = b_.empty() ? b_ : join(bias(clamp_min0), bias(clamp_max0));
      break;
    case Stack::kAlphaBetaMixed: {  // [x+ W+ + x- W- + b+; x+ W- + x- W+ + b-]
      const auto p = plus(), m = minus();
      s.in_blocks = 2, s.out_blocks = 2, s.blocks = {p, m, m, p};
      s.bias = b_.empty() ? b_ : join(bias(clamp_min0), bias(clamp_max0));
      break;
    }
    case Stack::kGamma:
    case Stack::kGammaMixed: {  // W + gamma W+ and W + gamma W- (a data backward only: no bias)
      const auto p = map(*w_, [gamma](float v) { return v + gamma * std::max(v, 0.f); });
      const auto m = map(*w_, [gamma](float v) { return v + gamma * std::min(v, 0.f); });
      s.out_blocks = 2, s.blocks = {p, m};
      if (stack == Stack::kGammaMixed) s.in_blocks = 2, s.blocks = {p, m, m, p};
      break;
    }
    case Stack::kZBox:  // [W, W+, W-] for x, low and high (a data backward only)
      s.in_blocks = 3, s.blocks = {w_, plus(), minus()};
      break;
    case Stack::kFlat:
      s.blocks = {std::make_shared<const std::vector<float>>(weight_count_, 1.f)};
      break;
    case Stack::kSquare:
      s.blocks = {map(*w_, [](float v) { return v * v; })}, s.bias = bias([](float v) { return v * v; });
      break;
  }
  return s;
}

LinearRule::Product& LinearRule::product(const LinearOps& ops, Stack stack) {
  auto found = products_.find(stack);
  if (found != products_.end()) return found->second;
  Product& made = products_[stack];
  WeightStack weights = this->weights(stack);
  if (ops.stacked) made.fast = ops.stacked(weights);
  if (!made.fast) made.weights = std::move(weights);
  return made;
}

void LinearRule::run_forward(const LinearOps& ops, Stack stack, const float* x, float* z) {
  Product& p = product(ops, stack);
  if (p.fast) return p.fast->forward(ops.images, x, z);
  const WeightStack& s = p.weights;
  const std::int64_t n_in = ops.in_count(), n_out = ops.out_count();
  float* spare = sized(scratch_->spare, n_out);
  for (int j = 0; j < s.out_blocks; ++j) {
    float* out = z + j * n_out;
    const float* bias = s.bias.empty() ? nullptr : s.bias.data() + std::int64_t(j) * ops.outputs;
    for (int i = 0; i < s.in_blocks; ++i) {
      const float* w = s.blocks[j * s.in_blocks + i]->data();
      if (i == 0) {
        ops.forward(x, w, bias, out);
      } else {
        ops.forward(x + i * n_in, w, nullptr, spare);
        each(n_out, [&](std::int64_t e) { out[e] += spare[e]; });
      }
    }
  }
}

void LinearRule::run_backward(const LinearOps& ops, Stack stack, const float* s, float* c) {
  Product& p = product(ops, stack);
  if (p.fast) return p.fast->backward_data(ops.images, s, c);
  const WeightStack& w = p.weights;
  const std::int64_t n_in = ops.in_count(), n_out = ops.out_count();
  float* spare = sized(scratch_->spare, n_in);
  for (int i = 0; i < w.in_blocks; ++i) {
    float* out = c + i * n_in;
    for (int j = 0; j < w.out_blocks; ++j) {
      const float* weights = w.blocks[j * w.in_blocks + i]->data();
      if (j == 0) {
        ops.backward_data(s, weights, out);
      } else {
        ops.backward_data(s + j * n_out, weights, spare);
        each(n_in, [&](std::int64_t e) { out[e] += spare[e]; });
      }
    }
  }
}

const float* LinearRule::split(const LinearOps& ops, const float* x) {
  const std::int64_t n_in = ops.in_count();
  float* both = sized(scratch_->input, 2 * n_in);
  each(n_in, [&](std::int64_t i) { both[i] = std::max(x[i], 0.f), both[n_in + i] = std::min(x[i], 0.f); });
  return both;
}

void LinearRule::forward(const LinearOps& ops, const float* x, const float* z) {
  if (ops.geometry != geometry_) {  // another input size: products and per-image denominators anew
    products_.clear(), per_image_.clear();
    geometry_ = ops.geometry;
  }
  const std::int64_t n_in = ops.in_count(), n_out = ops.out_count();
  const float eps = rule_.epsilon;
  denominator_.resize(n_out);
  float* d = denominator_.data();
  nonnegative_ = std::all_of(x, x + n_in, [](float v) { return v >= 0.f; });
  const auto own_output = [&](float* out) {  // W x + b: the layer's, or computed again (BatchNorm merged)
    if (z)
      std::copy_n(z, n_out, out);
    else
      run_forward(ops, Stack::kOwn, x, out);
  };
  // x+ W+ + x- W- + b+ (zplus's denominator; gamma's from it)
  const auto positive_part = [&](float* out) {
    if (nonnegative_)
      run_forward(ops, Stack::kPlus, x, out);
    else
      run_forward(ops, Stack::kPlusMixed, split(ops, x), out);
  };
  // A denominator that is the same for every image (inputs of ones, or zbox's bounds), computed once.
  const auto per_image = [&](Stack stack, const float* first, const float* second) {
    if (!per_image_.empty()) return;
    const int blocks = second ? 2 : 1;
    float* in = sized(scratch_->input, blocks * n_in);
    for (int n = 0; n < ops.images; ++n) {
      std::copy_n(first, ops.in_per_image, in + n * ops.in_per_image);
      if (second) std::copy_n(second, ops.in_per_image, in + n_in + n * ops.in_per_image);
    }
    float* out = sized(scratch_->output, n_out);
    run_forward(ops, stack, in, out);
    per_image_.assign(out, out + ops.out_per_image);
  };
  switch (rule_.kind) {
    case RuleKind::kEpsilon:
      own_output(d);
      break;
    case RuleKind::kZPlus:
      positive_part(d);
      break;
    case RuleKind::kAlphaBeta: {
      float* both = sized(scratch_->output, 2 * n_out);
      run_forward(ops, nonnegative_ ? Stack::kAlphaBeta : Stack::kAlphaBetaMixed,
                  nonnegative_ ? x : split(ops, x), both);
      second_denominator_.resize(n_out);
      float* d2 = second_denominator_.data();
      each(n_out, [&](std::int64_t i) { d[i] = both[i], d2[i] = stabilize(both[n_out + i], eps); });
      break;
    }
    case RuleKind::kGamma: {
      // With P = x+ W+ + x- W- + b+ (>= 0) and z the layer's output: x+ (W + gamma W+) + x- (W + gamma W-)
      // + b + gamma b+ = z + gamma P, and the other term's = z + gamma (z - P). Each is used only where z
      // has its sign, where both its parts do: no cancellation, one product instead of two.
      float* p = sized(scratch_->output, n_out);
      positive_part(p);
      own_output(d);
      second_denominator_.resize(n_out);
      float* d2 = second_denominator_.data();
      const float gamma = rule_.gamma;
      // A term the output's sign switches off gets an infinite denominator: its share R / inf is 0.
      const float inf = std::numeric_limits<float>::infinity();
      each(n_out, [&](std::int64_t i) {
        const float zi = d[i];
        d[i] = zi > 0.f ? stabilize(zi + gamma * p[i], eps) : inf;
        d2[i] = zi < 0.f ? stabilize(zi + gamma * (zi - p[i]), eps) : inf;
      });
      return;
    }
    case RuleKind::kZBox: {
      own_output(d);
      if (per_image_.empty()) {  // low W+ + high W- + b+ + b-: the layer's bias b
        per_image(Stack::kPlusMixed, low_.data(), high_.data());
        if (!b_.empty()) {
          const std::int64_t spatial = ops.out_per_image / ops.outputs;
          for (std::int64_t i = 0; i < ops.out_per_image; ++i)
            per_image_[i] += std::min(b_[i / spatial], 0.f);
        }
      }
      const std::int64_t per = ops.out_per_image;
      each(n_out, [&](std::int64_t i) { d[i] = d[i] - per_image_[i % per]; });
      break;
    }
    case RuleKind::kFlat:
    case RuleKind::kWSquare: {
      const std::vector<float> ones(ops.in_per_image, 1.f);
      per_image(rule_.kind == RuleKind::kFlat ? Stack::kFlat : Stack::kSquare, ones.data(), nullptr);
      const std::int64_t per = ops.out_per_image;
      each(n_out, [&](std::int64_t i) { d[i] = per_image_[i % per]; });
      break;
    }
    default:
      throw std::logic_error("not a linear layer's rule");
  }
  each(n_out, [&](std::int64_t i) { d[i] = stabilize(d[i], eps); });
}

void LinearRule::backward(const LinearOps& ops, const float* x, const float* r_out, float* r_in) {
  const std::int64_t n_in = ops.in_count(), n_out = ops.out_count();
  const float* d = denominator_.data();
  const float* d2 = second_denominator_.data();
  float* s = sized(scratch_->signal, 2 * n_out);
  float* c = sized(scratch_->input, 3 * n_in);
  // R_in = x+ * c[0] + x- * c[1]: the two-sided rules' reducer
  const auto two_sided = [&](Stack nonnegative, Stack mixed) {
    if (nonnegative_) {
      run_backward(ops, nonnegative, s, c);
      each(n_in, [&](std::int64_t i) { r_in[i] = x[i] * c[i]; });
    } else {
      run_backward(ops, mixed, s, c);
      each(n_in,
           [&](std::int64_t i) { r_in[i] = std::max(x[i], 0.f) * c[i] + std::min(x[i], 0.f) * c[n_in + i]; });
    }
  };
  switch (rule_.kind) {
    case RuleKind::kEpsilon:
      each(n_out, [&](std::int64_t i) { s[i] = r_out[i] / d[i]; });
      run_backward(ops, Stack::kOwn, s, c);
      each(n_in, [&](std::int64_t i) { r_in[i] = x[i] * c[i]; });
      return;
    case RuleKind::kFlat:
    case RuleKind::kWSquare:
      each(n_out, [&](std::int64_t i) { s[i] = r_out[i] / d[i]; });
      run_backward(ops, rule_.kind == RuleKind::kFlat ? Stack::kFlat : Stack::kSquare, s, r_in);
      return;
    case RuleKind::kZBox: {
      each(n_out, [&](std::int64_t i) { s[i] = r_out[i] / d[i]; });
      run_backward(ops, Stack::kZBox, s, c);
      const std::int64_t per = ops.in_per_image;
      each(n_in, [&](std::int64_t i) {
        r_in[i] = x[i] * c[i] - (low_[i % per] * c[n_in + i] + high_[i % per] * c[2 * n_in + i]);
      });
      return;
    }
    case RuleKind::kZPlus:
      each(n_out, [&](std::int64_t i) { s[i] = r_out[i] / d[i]; });
      return two_sided(Stack::kPlus, Stack::kPlusMixed);
    case RuleKind::kAlphaBeta: {  // alpha (the positive term) - beta (the negative term)
      const float alpha = rule_.alpha, beta = rule_.beta;
      each(n_out, [&](std::int64_t i) {
        s[i] = alpha * (r_out[i] / d[i]), s[n_out + i] = -beta * (r_out[i] / d2[i]);
      });
      return two_sided(Stack::kAlphaBeta, Stack::kAlphaBetaMixed);
    }
    case RuleKind::kGamma:
      each(n_out, [&](std::int64_t i) { s[i] = r_out[i] / d[i], s[n_out + i] = r_out[i] / d2[i]; });
      return two_sided(Stack::kGamma, Stack::kGammaMixed);
    default:
      throw std::logic_error("not a linear layer's rule");
  }
}

std::int64_t LinearRule::floats_per_image(std::int64_t, std::int64_t out_per_image) const {
  return 2 * out_per_image;  // the denominators
}

std::int64_t LinearRule::scratch_floats_per_image(std::int64_t in_per_image,
                                                  std::int64_t out_per_image) const {
  // inputs of three blocks, outputs and signals of two, a block of either, and the faster products' copies
  return 3 * in_per_image + 4 * out_per_image + std::max(in_per_image, out_per_image) +
         (3 * in_per_image + 2 * out_per_image);
}

}  // namespace fastsal::layers
