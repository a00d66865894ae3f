// Fully connected products at the few rows saliency has (one per image, or per (image, class) in the
// class head). OpenBLAS's sgemm packs all of W first and reads VGG-16's fc6 (411 MB) at a third of the
// memory bandwidth there; these stream W once, rows of it against every input row, and are
// memory-bound. Many rows: Caffe's own GEMM.
#pragma once

namespace fastsal {

// bottom_diff (m x inputs) = top_diff (m x outputs) . W (outputs x inputs): the data backward.
void inner_product_backward(int m, int inputs, int outputs, const float* top_diff, const float* weights,
                            float* bottom_diff);

// top (m x outputs) = bottom (m x inputs) . W^T + bias (null: none): the forward, rounded in another
// order than Caffe's (the inexact mode only).
void inner_product_forward(int m, int inputs, int outputs, const float* bottom, const float* weights,
                           const float* bias, float* top);

}  // namespace fastsal
