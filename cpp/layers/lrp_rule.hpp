// Layer-wise relevance propagation's rules (zennit's names and formulas): what a layer's backward computes
// when relevance, not the gradient, flows as the diff. LinearRule is the rule backward of the linear layers
// (convolution, inner product), written once over their forward and data-backward products.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
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

// Several of a rule's terms as one product: the input is `in_blocks` tensors the layer's input's shape
// (x+ then x-, ...) and the output `out_blocks` tensors its output's shape, each block the whole batch
// (block-major). Weight block (j, i) maps input block i to output block j; bias: out_blocks x outputs.
struct WeightStack {
  int in_blocks = 1, out_blocks = 1;
  std::vector<std::shared_ptr<const std::vector<float>>> blocks;  // out_blocks x in_blocks, row-major
  std::vector<float> bias;                                        // empty: none
};

// One stacked product, with its weights laid out once: z = x W (+ b), c = s W^T (the data backward).
class StackedProduct {
 public:
  virtual ~StackedProduct() = default;
  virtual void forward(int images, const float* x, float* z) = 0;
  virtual void backward_data(int images, const float* s, float* c) = 0;
};

// Buffers every ruled layer of a net uses only within its own forward or backward (they run one at a
// time), shared so that they cost the largest layer's need, not the sum.
struct RuleScratch {
  std::vector<float> input, output, signal, spare;
};

// The products a linear layer's rule needs, each over the whole batch, with modified weights: z = x W' (+ b'
// per output channel when b is not null), and c = s W' (the data backward, overwriting c). `stacked`, where
// set, builds a faster product of a whole stack (oneDNN's convolution); otherwise the stack's blocks go
// through `forward` and `backward_data` one at a time.
struct LinearOps {
  std::function<void(const float* x, const float* w, const float* b, float* z)> forward;
  std::function<void(const float* s, const float* w, float* c)> backward_data;
  std::function<std::unique_ptr<StackedProduct>(const WeightStack&)> stacked;
  std::vector<int> geometry;  // the layer's input and output shapes but the batch: products change with it
  int images = 0;             // the batch
  int outputs = 0;            // output channels (the bias's length)
  std::int64_t weight_count = 0;  // floats of W, outputs rows of weight_count / outputs
  std::int64_t in_per_image = 0;  // floats of one image's input
  std::int64_t out_per_image = 0;
  std::int64_t in_count() const { return in_per_image * images; }
  std::int64_t out_count() const { return out_per_image * images; }
};

// One linear layer's rule. prepare() builds the modified weights once (w+, w-, gamma's, w^2, ones) into the
// stacked products it needs, the forward() after each forward pass computes the rule's stabilized
// denominators (they do not depend on the class), and backward() maps one class's relevance R_out to R_in:
//   s = R_out / stabilize(z'),  c = s W'^T (the data backward with W'),  R_in = x' * c,
// summed over the rule's terms (zennit's BasicHook: input modifiers, parameter modifiers, reducer). Terms
// that share an input or a signal run as one product over stacked blocks.
class LinearRule {
 public:
  explicit LinearRule(Rule rule, std::shared_ptr<RuleScratch> scratch = nullptr)
      : rule_(std::move(rule)), scratch_(scratch ? std::move(scratch) : std::make_shared<RuleScratch>()) {}
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
  // Floats kept per image between the forward and the backward passes (the layer's own), and those used
  // only within them (shared by every ruled layer: the largest counts).
  std::int64_t floats_per_image(std::int64_t in_per_image, std::int64_t out_per_image) const;
  std::int64_t scratch_floats_per_image(std::int64_t in_per_image, std::int64_t out_per_image) const;

 private:
  // The stacks the rule's terms use; the x- variants where the input has negative values.
  enum class Stack {
    kOwn,
    kPlus,
    kPlusMixed,
    kAlphaBeta,
    kAlphaBetaMixed,
    kGamma,
    kGammaMixed,
    kZBox,
    kFlat,
    kSquare
  };
  // A stack's product for this batch: the faster one where the ops build one, else its blocks one at a
  // time through the ops' own products.
  struct Product {
    WeightStack weights;  // the generic products' (the faster one lays out its own copy)
    std::unique_ptr<StackedProduct> fast;
  };
  Product& product(const LinearOps& ops, Stack stack);
  void run_forward(const LinearOps& ops, Stack stack, const float* x, float* z);
  void run_backward(const LinearOps& ops, Stack stack, const float* s, float* c);
  WeightStack weights(Stack stack) const;
  // x+ then x- of the batch, block-major, into the scratch's input.
  const float* split(const LinearOps& ops, const float* x);

  Rule rule_;
  std::shared_ptr<RuleScratch> scratch_;
  bool prepared_ = false;
  bool nonnegative_ = false;  // the last forward's input had no negative value: the x- terms vanish
  std::vector<int> geometry_;
  std::int64_t weight_count_ = 0;
  std::shared_ptr<const std::vector<float>> w_;  // the layer's weights, BatchNorm merged
  std::vector<float> b_;                         // and bias (empty: none)
  std::map<Stack, Product> products_;
  std::vector<float> denominator_, second_denominator_;  // from the last forward
  std::vector<float> per_image_;  // a denominator that is the same for every image (flat, w^2, zbox's bounds)
  std::vector<float> low_, high_;  // zbox's bounds, one image
};

}  // namespace fastsal::layers
