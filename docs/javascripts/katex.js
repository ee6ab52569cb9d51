// Render the formulas that pymdownx.arithmatex (generic mode) wraps in <span|div class="arithmatex">
// with the KaTeX copy bundled under javascripts/katex/: viewing the site fetches nothing.
// document$ is Material's page observable (it also fires after instant navigation).
document$.subscribe(({ body }) => {
  body.querySelectorAll(".arithmatex").forEach((el) => {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,  // a bad formula shows in red (.katex-error), which the site check rejects
    });
  });
});
