from vllm_ampere.patches import all_patches, render_markdown

print(render_markdown(all_patches()), end="")
