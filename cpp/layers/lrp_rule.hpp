// Layer-wise relevance propagation's rules (zennit's names and formulas): what a layer's backward computes
// when relevance, not the gradient, flows as the diff. LinearRule is the rule backward of the linear layers
// (convolution, inner product), written once over their forward and data-backward products.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace fastsal::layers {

enum class RuleKind { kGradient, kPass, kNorm, kEpsilon, kGamma, kAlphaBeta, kZPlus, kZBox, kFlat, kWSquare };

struct Rule {
  RuleKind kind = RuleKind::kGradient;
  float epsilon = 1e-6f;  // the epsilon rule's epsilon; every other rule's stabilizer
  float gamma = 0.25f, alpha = 2.f, beta = 1.f;
  std::vector<float> low, high;  // zbox: one value, or one per element of the layer's input for one image
};

// Whether the rule is one of a linear layer's (convolution, inner product).
bool linear_rule(RuleKind kind);

// zennit's Stabilizer: z + eps sign(z), the sign of 0 taken as +1.
inline float stabilize(float z, float eps) { return z + (z >= 0.f ? eps : -eps); }

// The products a linear layer's rule needs, each over the whole batch, with modified weights: z = x W' (+ b'
// per output channel when b is not null), and c = s W' (the data backward, overwriting c).
struct LinearOps {
  std::function<void(const float* x, const float* w, const float* b, float* z)> forward;
  std::function<void(const float* s, const float* w, float* c)> backward_data;
  int outputs = 0;                // output channels (the bias's length)
  std::int64_t weight_count = 0;  // floats of W, outputs rows of weight_count / outputs
  std::int64_t in_count = 0;      // floats of the layer's input, whole batch
  std::int64_t out_count = 0;     // floats of its output, whole batch
  std::int64_t in_per_image = 0;  // floats of one image's input (zbox's bounds)
};

// One linear layer's rule. prepare() builds the modified weights once (w+, w-, gamma's, w^2, ones), the
// forward() after each forward pass computes the rule's stabilized denominators (they do not depend on the
// class), and backward() maps one class's relevance R_out to R_in:
//   s = R_out / stabilize(z'),  c = s W'^T (the data backward with W'),  R_in = x' * c,
// summed over the rule's terms (zennit's BasicHook: input modifiers, parameter modifiers, reducer).
class LinearRule {
 public:
  explicit LinearRule(Rule rule) : rule_(std::move(rule)) {}
  const Rule& rule() const { return rule_; }

  // Weights W (ops.weight_count floats) and bias b (ops.outputs floats, or null), optionally folded with a
  // per-output-channel affine map y = scale * z + shift (a BatchNorm and Scale after a convolution).
  void prepare(const LinearOps& ops, const float* w, const float* b, const std::vector<float>& scale,
               const std::vector<float>& shift);
  bool prepared() const { return prepared_; }
  // The weights changed in place (MPRT's randomised copy): the next forward prepares them again.
  void invalidate() { prepared_ = false; }
  // z: the layer's own output W x + b for this x (before any in-place layer after it), or null.
  void forward(const LinearOps& ops, const float* x, const float* z);
  void backward(const LinearOps& ops, const float* x, const float* r_out, float* r_in);
  // Floats kept per image between the forward and the backward passes, and used in them.
  std::int64_t floats_per_image(std::int64_t in_per_image, std::int64_t out_per_image) const;

 private:
  Rule rule_;
  bool prepared_ = false;
  bool nonnegative_ = false;  // the last forward's input had no negative value: the x- terms vanish
  // Modified weights and biases; empty where the rule does not use them.
  std::vector<float> w_, w_plus_, w_minus_, w_gamma_plus_, w_gamma_minus_, w_square_, w_ones_;
  std::vector<float> b_, b_plus_, b_minus_, b_gamma_plus_, b_gamma_minus_, b_square_;
  std::vector<float> denominator_, second_denominator_;  // from the last forward
  std::vector<float> low_, high_;                        // zbox's bounds, batch-sized
  std::vector<float> positive_, negative_, ones_, s_, t_, c_, d_;
};

}  // namespace fastsal::layers
