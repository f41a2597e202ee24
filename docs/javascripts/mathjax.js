// MathJax 3 configuration for pymdownx.arithmatex (generic mode), as mkdocs-material documents it:
// arithmatex wraps maths in <span class="arithmatex">\( ... \)</span> / <div class="arithmatex">\[ ... \]</div>.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
